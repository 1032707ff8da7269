"""The six phases of the benchmark (a-f). Each returns its JSON section."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import psycopg
import redis

from bench import data, load, ui
from bench.config import tool_path

if TYPE_CHECKING:
    from bench.run import Bench


# --- helpers --------------------------------------------------------------------------------


def _queue_busy(bench: Bench) -> int:
    """Doorbells waiting in Redis plus those a worker has taken and not yet acknowledged."""
    connection = redis.Redis.from_url(bench.env["REDIS_URL"])
    try:
        return int(connection.llen("celery")) + int(connection.hlen("unacked"))
    finally:
        connection.close()


def _ring_all(bench: Bench) -> None:
    from common.doorbells import ring

    for code in bench.config.currencies:
        if not ring(code):
            raise RuntimeError("the doorbell could not be published")


def drain(bench: Bench, label: str) -> dict[str, Any]:
    """Wait until nothing is pending and no doorbell is queued; how long each took."""
    timeout = bench.config.drain_timeout_s
    pending_start = data.pending_count(bench.conn)
    done, seconds = ui.wait_until(
        f"{label}: pending", lambda: data.pending_count(bench.conn), timeout
    )
    queued_start = _queue_busy(bench)
    queue_done, queue_seconds = ui.wait_until(
        f"{label}: doorbells", lambda: _queue_busy(bench), timeout
    )
    if not (done and queue_done):
        raise RuntimeError(f"{label}: transfers or doorbells still queued after {timeout:.0f} s")
    return {
        "pending_at_start": pending_start,
        "pending_drained_s": round(seconds, 2),
        "doorbells_queued_after": queued_start,
        "doorbells_drained_s": round(queue_seconds, 2),
    }


def _audit(bench: Bench) -> dict[str, Any]:
    """common.audit's checks in one REPEATABLE READ snapshot, as `python -m common.audit`."""
    from common.audit import CHECKS

    started = time.perf_counter()
    with bench.conn.transaction():
        bench.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        found = [(c.name, row) for c in CHECKS for row in bench.conn.execute(c.sql).fetchall()]
    bench.failed |= bool(found)
    return {
        "ok": not found,
        "violations": len(found),
        "first_violations": [f"{name}: {tuple(row)}" for name, row in found[:10]],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _payers(bench: Bench) -> tuple[load.Payer, ...]:
    code = bench.config.currencies[0]
    return load.payers_for(bench.users[: bench.config.clients], bench.password, code)


def _payees(bench: Bench) -> tuple[int, ...]:
    return tuple(user.accounts[bench.config.currencies[0]] for user in bench.users)


def warm_auth(bench: Bench) -> int:
    """Fill every web process's auth cache with the clients' credentials; the number of
    rounds it took.

    A user's first request on a web process verifies the password (argon2id at
    production cost, `argon2_verify_ms`); later ones hit the cache for AUTH_CACHE_TTL.
    Measured runs should see that steady state, not a burst of verifications: rounds
    of one request per user, each on a new connection (the kernel hands it to either
    web process), until three rounds in a row answered faster than a verification.
    """
    threshold = max(0.015, 0.6 * bench.verify_s)
    payers = _payers(bench)

    async def one(http: aiohttp.ClientSession, payer: load.Payer) -> tuple[float, int]:
        begin = time.perf_counter()
        headers = {"Authorization": payer.authorization}
        async with http.get(f"/users/{payer.user_id}/accounts", headers=headers) as response:
            await response.read()
        return time.perf_counter() - begin, response.status

    async def rounds() -> int:
        count = fast = 0
        async with load.session(bench.port, limit=4, force_close=True) as http:
            while count < 30 and fast < 3:
                count += 1
                answers = await asyncio.gather(*(one(http, payer) for payer in payers))
                if any(status != 200 for _, status in answers):
                    raise RuntimeError(f"auth warm-up: unexpected statuses {answers}")
                fast = fast + 1 if max(s for s, _ in answers) < threshold else 0
        return count

    return asyncio.run(rounds())


def _backlog(bench: Bench, count: int, seed: int, label: str) -> tuple[int, int]:
    config = bench.config
    rows = data.random_rows(bench.users, bench.table, config.currencies, count, random.Random(seed))
    with ui.bar(f"{label}: insert pending", count, "transfers") as progress:
        return data.insert_pending(bench.conn, rows, count, progress.update)


# --- a: pgbench -----------------------------------------------------------------------------


def pgbench(bench: Bench) -> dict[str, Any]:
    """TPC-B-like pgbench on the same server: the reference for phase b."""
    config = bench.config
    binary = bench.pg.bin / "pgbench"
    command = [str(binary) if binary.exists() else tool_path("pgbench") or "pgbench"]
    with psycopg.connect(bench.pg.conninfo("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE pgbench")
    target = ["-h", "127.0.0.1", "-p", str(bench.pg.port), "-U", "postgres", "pgbench"]
    ui.say(f"pgbench -i -s {config.pgbench_scale}")
    init = [*command, "-i", "-q", "-s", str(config.pgbench_scale), *target]
    subprocess.run(init, check=True, capture_output=True)
    command += [
        "-c", str(config.pgbench_clients),
        "-j", str(min(config.pgbench_clients, bench.results["machine"]["cores"] or 1)),
        "-T", str(config.pgbench_seconds), "-P", "1", *target,
    ]  # fmt: skip
    ui.say(f"a: pgbench TPC-B-like, {config.pgbench_seconds} s")
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    out = run.stdout
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if run.returncode != 0 or tps is None:
        raise RuntimeError(f"pgbench failed: {out[-2000:]}")
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    return {
        "tps": round(float(tps.group(1)), 1),
        "latency_avg_ms": float(latency.group(1)) if latency else None,
        "scale": config.pgbench_scale,
        "clients": config.pgbench_clients,
        "seconds": config.pgbench_seconds,
        "tps_per_second": [
            float(x) for x in re.findall(r"progress: \S+ s, ([\d.]+) tps", run.stderr)
        ],
        "command": " ".join(["pgbench", *command[1:]]),
    }


# --- b: settlement --------------------------------------------------------------------------


def settlement(bench: Bench) -> dict[str, Any]:
    from common.settings import DEFAULT_SETTLE_BATCH_SIZE

    config = bench.config
    drain(bench, "before b")
    # Doorbells with nothing to settle, a few per pool process: each process opens its
    # database pool and imports what settling needs before the clock starts.
    for _ in range(2 * config.worker_processes):
        _ring_all(bench)
    drain(bench, "b: worker warm-up")
    first, last = _backlog(bench, config.backlog, config.seed, "b")
    series: list[list[float]] = []
    started = time.perf_counter()
    _ring_all(bench)
    finished, _ = ui.wait_until(
        "b: settling the backlog",
        lambda: data.pending_count(bench.conn),
        config.drain_timeout_s,
        on_sample=lambda t, n: series.append([round(t, 2), n]),
    )
    seconds = time.perf_counter() - started
    if not finished:
        raise RuntimeError(f"backlog not drained within {config.drain_timeout_s:.0f} s")
    ids = (first, last)
    counts = dict(
        bench.conn.execute(
            "SELECT status, count(*) FROM transfers WHERE id BETWEEN %s AND %s GROUP BY status", ids
        ).fetchall()
    )
    span = data.scalar(
        bench.conn,
        "SELECT extract(epoch FROM max(settled_at) - min(settled_at)) * 1000 FROM transfers "
        "WHERE id BETWEEN %s AND %s",
        ids,
    )
    decided = counts.get("settled", 0) + counts.get("rejected", 0)
    result: dict[str, Any] = {
        "backlog": config.backlog,
        "currencies": list(config.currencies),
        "settled": counts.get("settled", 0),
        "rejected": counts.get("rejected", 0),
        "failed": counts.get("failed", 0),
        "seconds": round(seconds, 2),
        "settled_per_s": round(decided / seconds, 1),
        "server_side_per_s": round(decided / (span / 1000), 1) if span else None,
        "batch_size": int(bench.env.get("SETTLE_BATCH_SIZE") or DEFAULT_SETTLE_BATCH_SIZE),
        "pending_over_time": series,
    }
    reference = bench.results["phases"].get("a", {}).get("tps")
    if reference:
        result["ratio_to_pgbench"] = round(result["settled_per_s"] / reference, 2)
    result["queue"] = drain(bench, "after b")
    result["audit"] = _audit(bench)
    return result


# --- c: ingest ------------------------------------------------------------------------------


def ingest(bench: Bench) -> dict[str, Any]:
    from bench import stack

    config = bench.config
    tool = load.choose_tool(config.load_tool)
    if tool != config.load_tool != "python":
        ui.say(f"c: wrk is not installed ({load.INSTALL_WRK}): aiohttp drives c instead")
    drain(bench, "before c")
    payers, payees = _payers(bench), _payees(bench)
    workloads = {
        "trivial": load.Workload("get", "/currencies"),
        "health": load.Workload("get", "/health"),
        "post": load.Workload("post", payers=payers, payees=payees),
        "batch": load.Workload("batch", payers=payers, payees=payees, items=config.batch_items),
    }
    result: dict[str, Any] = {
        "tool": tool,
        "tool_version": load.tool_version(tool),
        "clients": config.clients,
        "seconds": config.ingest_seconds,
        "trivial_endpoint": "GET /currencies (no auth, no database query: Flask + gunicorn)",
        "workers_paused": True,
    }
    args = {"port": bench.port, "clients": config.clients, "folder": bench.logs}
    # Settlement would share the two cores with the API and blur what the API costs:
    # the worker stops taking doorbells; they wait in Redis and are drained after.
    first_id = data.scalar(bench.conn, "SELECT coalesce(max(id), 0) FROM transfers")
    stack.pause_consumers()
    try:
        for name, workload in workloads.items():
            if workload.payers:
                result[f"{name}_auth_warmup_rounds"] = warm_auth(bench)
            with ui.timed(f"c: {name} warm-up", config.warmup_seconds) as tick:
                load.closed_loop(tool, workload, seconds=config.warmup_seconds, tick=tick, **args)
            # The worker is paused and nothing was pending before: every transfer
            # committed during the run is pending, and counting them is cheap.
            before = data.pending_count(bench.conn)
            cpu_before = bench.meter.sample()
            with ui.timed(f"c: {name}", config.ingest_seconds) as tick:
                run = load.closed_loop(
                    tool, workload, seconds=config.ingest_seconds, tick=tick, **args
                )
            run["cpu_s"] = bench.meter.between(cpu_before, bench.meter.sample())
            if workload.payers:
                # Committed between the run's start and end (a batch commits its items
                # together, seconds after they were sent): transfers/s of the window.
                run["transfers_committed"] = data.pending_count(bench.conn) - before
                run["transfers_per_s"] = round(run["transfers_committed"] / run["seconds"], 1)
            result[name] = run
        # Should be 0: a doorbell taken before the pause would have settled meanwhile.
        result["settled_while_paused"] = data.scalar(
            bench.conn,
            "SELECT count(*) FROM transfers WHERE id > %s AND status <> 'pending'",
            (first_id,),
        )
    finally:
        stack.resume_consumers()
    trivial = result["trivial"]["requests_per_s"]
    result["ratio_post_to_trivial"] = round(result["post"]["requests_per_s"] / trivial, 3)
    result["ratio_batch_to_trivial"] = round(result["batch"]["transfers_per_s"] / trivial, 3)
    _ring_all(bench)
    after = result["drain_after"] = drain(bench, "after c")
    if after["pending_at_start"] and after["pending_drained_s"]:
        after["settled_per_s"] = round(after["pending_at_start"] / after["pending_drained_s"], 1)
    return result


# --- d: end-to-end latency ------------------------------------------------------------------


async def _fetch(
    http: aiohttp.ClientSession, method: str, url: str, **options: Any
) -> tuple[int, Any, str]:
    """Status, JSON body (None unless 2xx) and Retry-After of one request."""
    async with http.request(method, url, **options) as response:
        body = await response.read()
        retry_after = response.headers.get("Retry-After", "")
    ok = 200 <= response.status < 300
    return response.status, json.loads(body) if ok else None, retry_after


class OpenLoop:
    """Transfers submitted at a fixed rate whatever the answers (open loop), each
    followed by long polls (?wait=) until it is final. Latency counts from the moment
    an operation was due, so a server that falls behind cannot hide its queue (no
    coordinated omission)."""

    WAIT_S = 10
    # An operation still pending this long after it was due counts as still_pending.
    DEADLINE_S = 3 * WAIT_S
    # Connections at most; an operation beyond waits for one, and that counts in its latency.
    CONNECTIONS = 512

    def __init__(self, payers: tuple[load.Payer, ...], payees: tuple[int, ...]) -> None:
        self.build = load.request_builder(
            load.Workload("post", payers=payers, payees=payees), random.Random(7)
        )
        self.payers = payers
        self.e2e: list[float] = []
        self.submit: list[float] = []
        self.server: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.unheld = 0  # long polls answered at once with Retry-After (no slot free)
        self.opened = 0

    def _outcome(self, name: str) -> None:
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    async def _operation(self, http: aiohttp.ClientSession, number: int, due: float) -> None:
        payer = self.payers[number % len(self.payers)]
        status, transfer, _ = await _fetch(http, **self.build(number))
        if status != 202:
            self._outcome(f"post_{status}")
            return
        self.submit.append(time.perf_counter() - due)
        url = f"/users/{payer.user_id}/transfers/{transfer['id']}?wait={self.WAIT_S}"
        headers = {"Authorization": payer.authorization}
        while transfer["status"] == "pending" and time.perf_counter() < due + self.DEADLINE_S:
            status, transfer, retry_after = await _fetch(http, "GET", url, headers=headers)
            if status != 200:
                self._outcome(f"get_{status}")
                return
            if transfer["status"] == "pending" and retry_after.isdigit():
                # Every long-poll slot was taken: ask again when told, as a client would.
                self.unheld += 1
                await asyncio.sleep(int(retry_after))
        if transfer["status"] == "pending":
            self._outcome("still_pending")
            return
        self.e2e.append(time.perf_counter() - due)
        self._outcome(transfer["status"])
        created, settled = transfer.get("created_at"), transfer.get("settled_at")
        if created and settled:
            elapsed = datetime.fromisoformat(settled) - datetime.fromisoformat(created)
            self.server.append(elapsed / timedelta(seconds=1))

    async def _one(
        self, http: aiohttp.ClientSession, number: int, due: float, progress: Any
    ) -> None:
        try:
            await self._operation(http, number, due)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            self._outcome(type(error).__name__)
        progress.update()

    async def _opened(self, *_: object) -> None:
        self.opened += 1

    async def run(self, port: int, rate: float, count: int, progress: Any) -> dict[str, Any]:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._opened)
        http = load.session(port, limit=self.CONNECTIONS)
        http.trace_configs.append(trace)
        trace.freeze()
        async with http:
            start = time.perf_counter() + 0.2
            tasks = []
            for number in range(count):
                due = start + number / rate
                if (delay := due - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(http, number, due, progress)))
            # Every operation ends by its deadline and one more long poll: this bounds a
            # stuck server.
            await asyncio.wait_for(asyncio.gather(*tasks), self.DEADLINE_S + self.WAIT_S + 60)
        return {
            "operations": count,
            "connections_opened": self.opened,
            "outcomes": self.outcomes,
            "long_polls_unheld": self.unheld,
            "submit_to_settled_ms": load.summary_ms(self.e2e),
            "submit_response_ms": load.summary_ms(self.submit),
            "server_created_to_settled_ms": load.summary_ms(self.server),
        }


def latency(bench: Bench) -> dict[str, Any]:
    config = bench.config
    drain(bench, "before d")
    post_rate = bench.results["phases"].get("c", {}).get("post", {}).get("requests_per_s")
    rate = config.latency_rate or (config.latency_rate_factor * post_rate if post_rate else 20.0)
    rate = max(rate, 1.0)
    count = max(1, int(rate * config.latency_seconds))
    rounds = warm_auth(bench)
    # The phase's own cpu_s also counts the drains and the auth warm-up (argon2 for every
    # user in every web process): the open loop's CPU alone is what an operation costs.
    cpu_before = bench.meter.sample()
    with ui.bar("d: open-loop submit -> settled", count, "ops") as progress:
        loop = OpenLoop(_payers(bench), _payees(bench))
        result = asyncio.run(loop.run(bench.port, rate, count, progress))
    result["open_loop_cpu_s"] = bench.meter.between(cpu_before, bench.meter.sample())
    result["auth_warmup_rounds"] = rounds
    result["rate_per_s"] = round(rate, 1)
    result["rate_rule"] = (
        "given by --rate"
        if config.latency_rate
        else f"{config.latency_rate_factor} x phase c's POST maximum"
    )
    result["seconds"] = config.latency_seconds
    result["wait_param_s"] = OpenLoop.WAIT_S
    result["drain_after"] = drain(bench, "after d")
    return result


# --- e: reads -------------------------------------------------------------------------------


async def _sequential(port: int, requests: list[tuple[str, str]], warmup: int) -> dict[str, Any]:
    """(url, authorization) one after another on one keep-alive connection."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with load.session(port, limit=1) as http:
        for number, (url, authorization) in enumerate(requests):
            begin = time.perf_counter()
            async with http.get(url, headers={"Authorization": authorization}) as response:
                await response.read()
            elapsed = time.perf_counter() - begin
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if number >= warmup:
                latencies.append(elapsed)
    return {"statuses": statuses, "latency_ms": load.summary_ms(latencies)}


def reads(bench: Bench) -> dict[str, Any]:
    config = bench.config
    drain(bench, "before e")
    total = data.scalar(bench.conn, "SELECT count(*) FROM transfers")
    missing = config.history_total - total
    result: dict[str, Any] = {"transfers_before_load": total}
    if missing > 0:
        rng = random.Random(config.seed + 5)
        rows = data.random_rows(bench.users, bench.table, config.currencies, missing, rng)
        started = time.perf_counter()
        with ui.bar("e: load settled history", missing, "transfers") as progress:
            first_last = data.insert_settled(
                bench.conn,
                rows,
                missing,
                commission_accounts=bench.commission_accounts(),
                started=data.now(bench.conn) - timedelta(days=2),
                progress=progress.update,
            )
        bench.loaded.ranges.append(first_last)
        result["history_loaded"] = missing
        result["history_load_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    ui.say("e: VACUUM ANALYZE (as autovacuum would have, for a table of that age)")
    for table in ("transfers", "postings", "accounts"):
        bench.conn.execute(f"VACUUM ANALYZE {table}")
    result["vacuum_analyze_s"] = round(time.perf_counter() - started, 1)
    result["transfers_in_table"] = data.scalar(bench.conn, "SELECT count(*) FROM transfers")
    result["postings_in_table"] = data.scalar(bench.conn, "SELECT count(*) FROM postings")

    payers = _payers(bench)
    per_user = max(1, config.reads // len(payers) + 1)
    visible: list[tuple[load.Payer, int]] = []
    for payer in payers:
        ids = bench.conn.execute(
            "SELECT id FROM transfers WHERE from_user_id = %s ORDER BY random() LIMIT %s",
            (payer.user_id, per_user),
        ).fetchall()
        visible += [(payer, row[0]) for row in ids]
    random.Random(config.seed + 6).shuffle(visible)
    result["auth_warmup_rounds"] = warm_auth(bench)
    # A short warm-up on the measuring connection itself (pools, caches, planner).
    warmup = 2 * len(payers)
    gets = [
        (f"/users/{payer.user_id}/transfers/{transfer_id}", payer.authorization)
        for payer, transfer_id in (visible * 2)[: warmup + config.reads]
    ]
    lists = [
        (f"/users/{payer.user_id}/transfers?limit=100", payer.authorization)
        for payer in (payers[i % len(payers)] for i in range(warmup + config.reads))
    ]
    with ui.bar("e: GET transfer, GET list (100)", 2, "kinds") as progress:
        result["get_transfer"] = asyncio.run(_sequential(bench.port, gets, warmup))
        progress.update()
        result["list_100"] = asyncio.run(_sequential(bench.port, lists, warmup))
        progress.update()
    result["method"] = (
        f"one keep-alive connection, requests one after another ({config.reads} measured per "
        f"kind after {warmup} warm-up), the {len(payers)} client users in turn"
    )
    return result


# --- f: memory ------------------------------------------------------------------------------


def memory(bench: Bench) -> dict[str, Any]:
    config = bench.config
    drain(bench, "before f")
    decided = data.decided_by_worker(bench.conn, bench.loaded)
    result: dict[str, Any] = {"settlements_before_top_up": decided}
    if decided < config.settlements:
        missing = config.settlements - decided
        _backlog(bench, missing, config.seed + 7, "f")
        _ring_all(bench)
        result["top_up"] = drain(bench, "f: top-up")
        result["top_up_transfers"] = missing
    result["settlements"] = data.decided_by_worker(bench.conn, bench.loaded)
    bench.remember_memory("after_settlements")
    snapshots = bench.results["memory"]
    # "Warm": after the first phase that made the group work (b for the worker, c for
    # gunicorn). Growth from there on is what a leak would look like; growth from the
    # start also counts first-use imports, pools, caches and copy-on-write of preloaded
    # pages in the forked children.
    warm_after = {"worker": "after_b", "web": "after_c"}
    for group in ("web", "worker"):
        start, after = snapshots["start"][group], snapshots["after_settlements"][group]
        section = result[group] = {
            "rss_start_mib": round(start["rss_kib"] / 1024, 1),
            "rss_after_mib": round(after["rss_kib"] / 1024, 1),
            "pss_start_mib": round(start["pss_kib"] / 1024, 1),
            "pss_after_mib": round(after["pss_kib"] / 1024, 1),
            "processes": len(after["processes"]),
            "rss_growth_pct": round(100 * (after["rss_kib"] / start["rss_kib"] - 1), 1),
        }
        if warm := snapshots.get(warm_after[group], {}).get(group):
            section["warm_snapshot"] = warm_after[group]
            section["rss_warm_mib"] = round(warm["rss_kib"] / 1024, 1)
            growth = 100 * (after["rss_kib"] / warm["rss_kib"] - 1)
            section["rss_growth_since_warm_pct"] = round(growth, 1)
    result["final_audit"] = _audit(bench)
    return result
