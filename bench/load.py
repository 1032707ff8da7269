"""HTTP load: wrk for phase c's closed loops when installed (µs of CPU per request where
a Python client takes tens), else aiohttp; aiohttp for everything else."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

LUA = Path(__file__).with_name("load.lua")


@dataclass(frozen=True)
class Payer:
    user_id: int
    authorization: str
    account: int


@dataclass(frozen=True)
class Workload:
    kind: str  # "get", "post" or "batch"
    path: str = "/currencies"
    payers: tuple[Payer, ...] = ()
    payees: tuple[int, ...] = ()
    items: int = 100


def summary_ms(seconds: Iterable[float], keys: Sequence[str] = ("p50", "p95", "p99")) -> dict:
    """Count, nearest-rank percentiles, max and mean of durations in seconds, in ms."""
    ordered = sorted(seconds)
    n = len(ordered)
    if not n:
        return {"count": 0} | dict.fromkeys([*keys, "max", "mean"])
    values = {key: ordered[max(1, math.ceil(int(key[1:]) * n / 100)) - 1] for key in keys}
    values |= {"max": ordered[-1], "mean": sum(ordered) / n}
    return {"count": n} | {key: round(value * 1000, 3) for key, value in values.items()}


def session(port: int, traces: list | None = None, **connector: Any) -> aiohttp.ClientSession:
    """gunicorn closes a connection idle for 5 s: one idle for 3 s is not reused."""
    if not connector.get("force_close"):
        connector.setdefault("keepalive_timeout", 3)
    return aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{port}",
        connector=aiohttp.TCPConnector(**connector),
        timeout=aiohttp.ClientTimeout(total=120),
        auto_decompress=False,
        trace_configs=traces,
    )


async def timed(http: aiohttp.ClientSession, **request: Any) -> tuple[int, float]:
    """One request of aiohttp's request() keywords, read to the end: status, seconds."""
    begin = time.perf_counter()
    async with http.request(**request) as response:
        await response.read()
    return response.status, time.perf_counter() - begin


def get(url: str, payer: Payer) -> dict[str, Any]:
    """aiohttp request() keywords: `payer`'s GET of `url`."""
    return {"method": "GET", "url": url, "headers": {"Authorization": payer.authorization}}


async def fetch(http: aiohttp.ClientSession, **request: Any) -> tuple[int, Any, str]:
    """Status, JSON body (None unless 2xx) and Retry-After of one request."""
    async with http.request(**request) as response:
        body, retry_after = await response.read(), response.headers.get("Retry-After", "")
    ok = 200 <= response.status < 300
    return response.status, json.loads(body) if ok else None, retry_after


def pending(body: dict[str, Any]) -> bool:
    return bool(body["status"] == "pending")


async def follow(
    http: aiohttp.ClientSession,
    url: str,
    payer: Payer,
    body: dict[str, Any],
    *,
    until: float,
    wait: int,
    busy: Callable[[dict[str, Any]], bool] = pending,
) -> tuple[int, dict[str, Any], int]:
    """Long-poll `url` (?wait=) while `busy(body)` and before `until` (perf_counter): the
    last status (200 unless it failed), the last body, and how many answers came unheld
    (every long-poll slot taken: asked again when Retry-After said, as a client would)."""
    poll, status, unheld = get(f"{url}?wait={wait}", payer), 200, 0
    while busy(body) and time.perf_counter() < until:
        status, answer, retry_after = await fetch(http, **poll)
        if status != 200:
            return status, body, unheld
        body = answer
        if busy(body) and retry_after.isdigit():
            unheld += 1
            await asyncio.sleep(int(retry_after))
    return status, body, unheld


async def paced(
    rate: float, count: int, operation: Callable[[int, float], Awaitable[None]]
) -> set[asyncio.Task[None]]:
    """Open loop: start `operation(n, due)` for n < count at `rate` per second, whatever
    the answers (latency counts from `due`: no coordinated omission); those still running."""
    running: set[asyncio.Task[None]] = set()

    async def run(number: int, due: float) -> None:
        await operation(number, due)

    start = time.perf_counter() + 0.2
    for number in range(count):
        due = start + number / rate
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(run(number, due))
        running.add(task)  # only the running ones are kept (a soak starts many)
        task.add_done_callback(running.discard)
    return running


async def run_sessions(
    http: aiohttp.ClientSession, sessions: Iterable[list[dict[str, Any]]], clients: int
) -> list[tuple[int, int, float]]:
    """`clients` loops on `http`, each taking the next session not yet started and sending
    its requests (request() keywords) one after another; each request's place in its
    session, status (0: a transport error) and seconds (timed from when it was sent)."""
    answers: list[tuple[int, int, float]] = []
    waiting = iter(sessions)  # shared: a session is taken by one client only

    async def client() -> None:
        for session in waiting:
            for place, request in enumerate(session):
                try:
                    answers.append((place, *await timed(http, **request)))
                except (aiohttp.ClientError, TimeoutError):
                    answers.append((place, 0, 0.0))  # status 0: no answer

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


def choose_tool(preference: str) -> tuple[str, str]:
    """The closed-loop tool (wrk unless told python or not installed) and its version."""
    if preference == "python" or not (wrk := shutil.which("wrk")):
        return "python", f"aiohttp {aiohttp.__version__}"
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return "wrk", f"wrk {match.group(1) if match else 'unknown'}"


def closed_loop(
    tool: str, workload: Workload, *, port: int, clients: int, seconds: float, folder: Path
) -> dict[str, Any]:
    """`clients` keep-alive connections, each sending its next request once answered."""
    loop = _wrk if tool == "wrk" else _aiohttp
    requests, seconds, errors, latency = loop(workload, port, clients, seconds, folder)
    return {
        "tool": tool,
        "requests": requests,
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / seconds, 1),
        "errors": {kind: count for kind, count in errors.items() if count},
        "latency_ms": latency,
    }


def _wrk(workload: Workload, port: int, clients: int, seconds: float, folder: Path) -> tuple:
    payers, payees = folder / "wrk-payers.txt", folder / "wrk-payees.txt"
    payers.write_text(
        "".join(f"{p.user_id} {p.account} {p.authorization}\n" for p in workload.payers)
    )
    payees.write_text("".join(f"{account}\n" for account in workload.payees))
    env = dict(os.environ, BENCH_MODE=workload.kind, BENCH_PATH=workload.path,
               BENCH_ITEMS=str(workload.items), BENCH_PAYERS=str(payers),
               BENCH_PAYEES=str(payees))  # fmt: skip
    command = [
        shutil.which("wrk") or "wrk", f"-t{max(1, min(2, clients))}", f"-c{clients}",
        f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(LUA),
        f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    # subprocess.run kills wrk if the run is interrupted: it must not outlive the bench.
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    match = re.search(r"^BENCH_JSON (\{.*\})$", run.stdout, re.MULTILINE)
    if run.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({run.returncode}): {(run.stderr or run.stdout).strip()}")
    raw = json.loads(match.group(1))
    latency = {key: raw[f"{key}_us"] / 1000 for key in ("p50", "p90", "p99", "max")}
    latency["mean"] = round(raw["mean_us"] / 1000, 3)
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")}
    return raw["requests"], raw["duration_us"] / 1e6, errors, latency


def request_builder(workload: Workload, rng: random.Random) -> Callable[[int], dict[str, Any]]:
    """n -> the keyword arguments of aiohttp's request() for the n-th request."""

    def transfer(payer: Payer) -> dict[str, Any]:
        """To another random payee, 1.00 to 99.99."""
        while (to := rng.choice(workload.payees)) == payer.account:
            pass
        minor = rng.randint(100, 9999)
        return {"from": payer.account, "to": to, "amount": f"{minor // 100}.{minor % 100:02d}"}

    def build(n: int) -> dict[str, Any]:
        if workload.kind == "get":
            return {"method": "GET", "url": workload.path}
        payer = workload.payers[n % len(workload.payers)]
        headers = {"Authorization": payer.authorization}
        if workload.kind == "post":
            form = {key: str(value) for key, value in transfer(payer).items()}
            url = f"/users/{payer.user_id}/transfers"
            return {"method": "POST", "url": url, "headers": headers, "data": form}
        items = [transfer(payer) for _ in range(workload.items)]
        url = f"/users/{payer.user_id}/transfers/batch"
        return {"method": "POST", "url": url, "headers": headers, "json": {"transfers": items}}

    return build


def _aiohttp(workload: Workload, port: int, clients: int, seconds: float, _: Path) -> tuple:
    build = request_builder(workload, random.Random(len(workload.payers) + clients))
    started = time.perf_counter()
    end = started + seconds
    # One-request sessions, users in turn as wrk's script does, until the time is up.
    numbers = itertools.takewhile(lambda _n: time.perf_counter() < end, itertools.count())
    requests = ([build(number)] for number in numbers)

    async def run() -> list[tuple[int, int, float]]:
        async with session(port, limit=clients) as http:
            return await run_sessions(http, requests, clients)

    answers = asyncio.run(run())
    elapsed, latencies = time.perf_counter() - started, [t for _, s, t in answers if s]
    errors = {"transport": len(answers) - len(latencies)}
    errors["status"] = sum(status >= 400 for _, status, _ in answers)
    return len(latencies), elapsed, errors, summary_ms(latencies, ("p50", "p90", "p99"))
