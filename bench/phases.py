"""The six phases of the benchmark (the issue's a-f). Each returns its JSON section."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import redis

from bench import client, data, loadgen, stats, ui
from bench.config import tool_path
from common.settings import DEFAULT_SETTLE_BATCH_SIZE

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
    from worker.tasks import ring

    for code in bench.config.currencies:
        if not ring(code):
            raise RuntimeError("the doorbell could not be published")


def drain(bench: Bench, label: str, series: list | None = None) -> dict[str, Any]:
    """Wait until nothing is pending and no doorbell is queued; how long each took."""
    pending_start = data.pending_count(bench.conn)
    finished, seconds = ui.wait_until(
        f"{label}: pending transfers",
        lambda: data.pending_count(bench.conn),
        bench.config.drain_timeout_s,
        poll=0.1,
        on_sample=(lambda t, n: series.append([round(t, 2), n])) if series is not None else None,
    )
    if not finished:
        raise RuntimeError(f"{label}: transfers still pending after {seconds:.0f} s")
    queued_start = _queue_busy(bench)
    queue_done, queue_seconds = ui.wait_until(
        f"{label}: queued doorbells", lambda: _queue_busy(bench), bench.config.drain_timeout_s
    )
    if not queue_done:
        raise RuntimeError(f"{label}: doorbells still queued after {queue_seconds:.0f} s")
    return {
        "pending_at_start": pending_start,
        "pending_drained_s": round(seconds, 2),
        "doorbells_queued_after": queued_start,
        "doorbells_drained_s": round(queue_seconds, 2),
    }


def _audit(bench: Bench) -> dict[str, Any]:
    """common.audit's checks, one by one for the progress bar, in one snapshot as
    `python -m common.audit` runs them."""
    from sqlalchemy import text

    from common.audit import CHECKS
    from common.db import transaction

    started = time.perf_counter()
    ui.say("auditing the ledger")
    violations = []
    with (
        ui.bar("auditing the ledger (common.audit)", len(CHECKS), "checks") as progress,
        transaction() as session,
    ):
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        for check in CHECKS:
            violations += [
                f"{check.name}: {tuple(row)}" for row in session.execute(text(check.sql))
            ]
            progress.update()
    return {
        "ok": not violations,
        "violations": len(violations),
        "first_violations": violations[:10],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _payers(bench: Bench) -> tuple[loadgen.Payer, ...]:
    code = bench.config.currencies[0]
    return loadgen.payers_for(bench.users[: bench.config.clients], bench.password, code)


def _payees(bench: Bench) -> tuple[int, ...]:
    code = bench.config.currencies[0]
    return tuple(user.accounts[code] for user in bench.users)


async def _warm_auth_async(port: int, payers: tuple[loadgen.Payer, ...], threshold_s: float) -> int:
    concurrency = asyncio.Semaphore(4)

    async def one(payer: loadgen.Payer) -> tuple[float, int]:
        async with concurrency:
            # A new connection each time: the kernel hands it to either web process.
            connection = client.Connection("127.0.0.1", port)
            try:
                begin = time.perf_counter()
                response = await connection.send(
                    client.Request(
                        "GET",
                        f"/users/{payer.user_id}/accounts",
                        (("Authorization", payer.authorization),),
                    )
                )
                return time.perf_counter() - begin, response.status
            finally:
                connection.close()

    rounds = fast = 0
    while rounds < 30 and fast < 3:
        rounds += 1
        answers = await asyncio.gather(*(one(payer) for payer in payers))
        if any(status != 200 for _, status in answers):
            raise RuntimeError(f"auth warm-up: unexpected statuses {answers}")
        slowest = max(seconds for seconds, _ in answers)
        fast = fast + 1 if slowest < threshold_s else 0
    return rounds


def warm_auth(bench: Bench) -> int:
    """Fill every web process's auth cache with the clients' credentials.

    A first request of a user on a web process verifies the password (argon2id,
    production cost, tens of milliseconds of CPU, measured by the bench at start:
    `argon2_verify_ms`); later ones hit the cache for
    AUTH_CACHE_TTL (60 s from the verification). Measured runs start right after this,
    so they see the steady state of active users, not a burst of verifications:
    rounds of one request per user, each on a new connection, until three rounds in a
    row answered fast. Returns the number of rounds.
    """
    # A request that verified a password took at least the verification's time; one
    # that hit the cache, a few milliseconds.
    threshold = max(0.015, 0.6 * bench.verify_s)
    return asyncio.run(_warm_auth_async(bench.port, _payers(bench), threshold))


def _backlog(bench: Bench, count: int, seed: int, label: str) -> tuple[int, int]:
    rows = data.random_rows(
        bench.users, bench.table, bench.config.currencies, count, random.Random(seed)
    )
    with ui.bar(f"{label}: insert pending", count, "transfers") as progress:
        return data.insert_pending(bench.conn, rows, count, progress.update)


# --- a: pgbench -----------------------------------------------------------------------------


def pgbench(bench: Bench) -> dict[str, Any]:
    """TPC-B-like pgbench on the same server: the reference for phase b."""
    config = bench.config
    binary = str(bench.pg.bin / "pgbench")
    if not (bench.pg.bin / "pgbench").exists():
        binary = tool_path("pgbench") or "pgbench"
    with psycopg.connect(bench.pg.conninfo("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE pgbench")
    target = ["-h", "127.0.0.1", "-p", str(bench.pg.port), "-U", "postgres"]
    with ui.bar("pgbench -i (load)", 1, "step") as progress:
        subprocess.run(
            [binary, "-i", "-q", "-s", str(config.pgbench_scale), *target, "pgbench"],
            check=True,
            capture_output=True,
        )
        progress.update()
    command = [
        binary,
        "-c", str(config.pgbench_clients),
        "-j", str(min(config.pgbench_clients, bench.results["machine"]["cores"] or 1)),
        "-T", str(config.pgbench_seconds),
        "-P", "1",
        *target,
        "pgbench",
    ]  # fmt: skip
    per_second = []
    with ui.timed("pgbench TPC-B-like", config.pgbench_seconds) as tick:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stderr is not None
        try:
            for line in process.stderr:
                match = re.match(r"progress: ([\d.]+) s, ([\d.]+) tps", line)
                if match:
                    tick(float(match.group(1)))
                    per_second.append(float(match.group(2)))
            out, _ = process.communicate()
        finally:
            if process.poll() is None:  # interrupted: pgbench must not outlive the run
                process.kill()
                process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out[-2000:]}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    if tps is None:
        raise RuntimeError(f"no tps in pgbench's output: {out[-2000:]}")
    return {
        "tps": round(float(tps.group(1)), 1),
        "latency_avg_ms": float(latency.group(1)) if latency else None,
        "scale": config.pgbench_scale,
        "clients": config.pgbench_clients,
        "seconds": config.pgbench_seconds,
        "tps_per_second": per_second,
        "command": " ".join(["pgbench", *command[1:]]),
    }


# --- b: settlement --------------------------------------------------------------------------


def settlement(bench: Bench) -> dict[str, Any]:
    config = bench.config
    drain(bench, "before b")
    # Doorbells with nothing to settle, a few per pool process: each process opens its
    # database pool and imports what settling needs before the clock starts.
    for _ in range(2 * config.worker_processes):
        _ring_all(bench)
    drain(bench, "b: worker warm-up")
    first, last = _backlog(bench, config.backlog, config.seed, "b")
    profile = _start_profile(bench, "b-worker", bench.worker.pid)
    series: list[list[float]] = []
    started = time.perf_counter()
    _ring_all(bench)
    finished, _ = ui.wait_until(
        "b: settling the backlog",
        lambda: data.pending_count(bench.conn),
        config.drain_timeout_s,
        poll=0.1,
        on_sample=lambda t, n: series.append([round(t, 2), n]),
    )
    seconds = time.perf_counter() - started
    if profile is not None:
        bench.results["profiles"]["b_worker"] = profile.stop()
    if not finished:
        raise RuntimeError(f"backlog not drained within {config.drain_timeout_s:.0f} s")
    counts = dict(
        bench.conn.execute(
            "SELECT status, count(*) FROM transfers WHERE id BETWEEN %s AND %s GROUP BY status",
            (first, last),
        ).fetchall()
    )
    span = bench.conn.execute(
        "SELECT extract(epoch FROM max(settled_at) - min(settled_at)) FROM transfers "
        "WHERE id BETWEEN %s AND %s",
        (first, last),
    ).fetchone()[0]
    decided = counts.get("settled", 0) + counts.get("rejected", 0)
    result: dict[str, Any] = {
        "backlog": config.backlog,
        "currencies": list(config.currencies),
        "settled": counts.get("settled", 0),
        "rejected": counts.get("rejected", 0),
        "failed": counts.get("failed", 0),
        "seconds": round(seconds, 2),
        "settled_per_s": round(decided / seconds, 1),
        "server_side_per_s": round(decided / float(span), 1) if span else None,
        "batch_size": int(bench.env.get("SETTLE_BATCH_SIZE") or DEFAULT_SETTLE_BATCH_SIZE),
        "pending_over_time": series,
        "backlog_insert": "COPY of pending rows as the API inserts them (see bench/data.py)",
    }
    reference = bench.results["phases"].get("a", {}).get("tps")
    if reference:
        result["ratio_to_pgbench"] = round(result["settled_per_s"] / reference, 2)
    result["queue"] = drain(bench, "after b")
    result["audit"] = _audit(bench)
    if not result["audit"]["ok"]:
        bench.failed = True
    return result


# --- c: ingest ------------------------------------------------------------------------------


def _max_id(bench: Bench) -> int:
    return data.scalar(bench.conn, "SELECT coalesce(max(id), 0) FROM transfers")


def ingest(bench: Bench) -> dict[str, Any]:
    from bench import stack

    config = bench.config
    tool = loadgen.choose_tool(config.load_tool)
    drain(bench, "before c")
    payers, payees = _payers(bench), _payees(bench)
    workloads = {
        "trivial": loadgen.Workload("get", "/currencies"),
        "health": loadgen.Workload("get", "/health"),
        "post": loadgen.Workload("post", payers=payers, payees=payees),
        "batch": loadgen.Workload("batch", payers=payers, payees=payees, items=config.batch_items),
    }
    result: dict[str, Any] = {
        "tool": tool,
        "tool_version": loadgen.wrk_version() if tool == "wrk" else "bench.client (asyncio)",
        "clients": config.clients,
        "seconds": config.ingest_seconds,
        "trivial_endpoint": "GET /currencies (no auth, no database query: Flask + gunicorn)",
        "workers_paused": True,
    }
    # Settlement would share the two cores with the API and blur what the API costs:
    # the worker stops taking doorbells; they wait in Redis and are drained after.
    first_id = _max_id(bench)
    stack.pause_consumers()
    try:
        for name, workload in workloads.items():
            load = {"port": bench.port, "clients": config.clients, "folder": bench.logs}
            if workload.payers:
                result[f"{name}_auth_warmup_rounds"] = warm_auth(bench)
            with ui.timed(f"c: {name} warm-up", config.warmup_seconds) as tick:
                loadgen.run(tool, workload, seconds=config.warmup_seconds, tick=tick, **load)
            # The worker is paused and nothing was pending before: every transfer
            # committed during the run is pending, and counting them is cheap.
            before = data.pending_count(bench.conn)
            profile = None
            if name in {"post", "batch"}:
                profile = _start_profile(bench, f"c-web-{name}", bench.web.pid)
            cpu_before = bench.meter.sample()
            with ui.timed(f"c: {name}", config.ingest_seconds) as tick:
                run = loadgen.run(tool, workload, seconds=config.ingest_seconds, tick=tick, **load)
            cpu = bench.meter.between(cpu_before, bench.meter.sample())
            committed = data.pending_count(bench.conn) - before
            if profile is not None:
                bench.results["profiles"][f"c_web_{name}"] = profile.stop()
            section = run.as_json()
            section["cpu_s"] = cpu
            if workload.payers:
                # Committed between the run's start and end (a batch commits its items
                # together, seconds after they were sent): transfers/s of the window.
                section["transfers_committed"] = committed
                section["transfers_per_s"] = round(committed / run.seconds, 1)
            result[name] = section
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
    result["drain_after"] = drain(bench, "after c")
    pending = result["drain_after"]["pending_at_start"]
    if pending and result["drain_after"]["pending_drained_s"]:
        result["drain_after"]["settled_per_s"] = round(
            pending / result["drain_after"]["pending_drained_s"], 1
        )
    return result


# --- d: end-to-end latency ------------------------------------------------------------------


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


class OpenLoop:
    """Transfers submitted at a fixed rate whatever the answers (open loop), each
    followed by long polls (?wait=) until it is final. Latency counts from the moment
    an operation was due, so a server that falls behind cannot hide its queue
    (no coordinated omission)."""

    WAIT_S = 10
    # An operation still pending this long after it was due counts as still_pending.
    DEADLINE_S = 3 * WAIT_S

    def __init__(self, port: int, payers: tuple[loadgen.Payer, ...], payees: tuple[int, ...]):
        self.pool = client.Pool("127.0.0.1", port, limit=512)
        self.payers, self.payees = payers, payees
        self.rng = random.Random(7)
        self.e2e: list[float] = []
        self.submit: list[float] = []
        self.server: list[float] = []
        self.outcomes: dict[str, int] = {}
        # Long polls answered at once with Retry-After (web.transfers: no slot free).
        self.unheld = 0

    def _outcome(self, name: str) -> None:
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def _request(self, number: int) -> tuple[loadgen.Payer, client.Request]:
        payer = self.payers[number % len(self.payers)]
        while True:
            to = self.payees[self.rng.randrange(len(self.payees))]
            if to != payer.account:
                break
        minor = self.rng.randint(100, 9999)
        body = f"from={payer.account}&to={to}&amount={minor // 100}.{minor % 100:02d}"
        headers = (
            ("Authorization", payer.authorization),
            ("Content-Type", "application/x-www-form-urlencoded"),
        )
        path = f"/users/{payer.user_id}/transfers"
        return payer, client.Request("POST", path, headers, body.encode())

    async def _submit(
        self, connection: client.Connection, number: int, due: float
    ) -> tuple[loadgen.Payer, client.Response] | None:
        """POST operation `number`'s transfer; None (and the outcome counted) unless 202."""
        payer, request = self._request(number)
        response = await connection.send(request)
        if response.status != 202:
            self._outcome(f"post_{response.status}")
            return None
        self.submit.append(time.perf_counter() - due)
        return payer, response

    async def _operation(self, connection: client.Connection, number: int, due: float) -> None:
        submitted = await self._submit(connection, number, due)
        if submitted is None:
            return
        payer, response = submitted
        transfer = json.loads(response.body)
        poll = client.Request(
            "GET",
            f"/users/{payer.user_id}/transfers/{transfer['id']}?wait={self.WAIT_S}",
            (("Authorization", payer.authorization),),
        )
        deadline = due + self.DEADLINE_S
        while transfer["status"] == "pending" and time.perf_counter() < deadline:
            response = await connection.send(poll)
            if response.status != 200:
                self._outcome(f"get_{response.status}")
                return
            transfer = json.loads(response.body)
            if transfer["status"] == "pending" and response.retry_after is not None:
                # Every long-poll slot was taken: ask again when told, as a client would.
                self.unheld += 1
                await asyncio.sleep(response.retry_after)
        if transfer["status"] == "pending":
            self._outcome("still_pending")
            return
        self.e2e.append(time.perf_counter() - due)
        self._outcome(transfer["status"])
        created = _parse_time(transfer["created_at"])
        settled = _parse_time(transfer["settled_at"])
        if created and settled:
            self.server.append((settled - created) / timedelta(seconds=1))

    async def _one(self, number: int, due: float, progress: Any) -> None:
        try:
            await self.pool.run(lambda connection: self._operation(connection, number, due))
        except (OSError, asyncio.IncompleteReadError, client.ConnectionClosed) as error:
            self._outcome(type(error).__name__)
        progress.update()

    async def run(self, rate: float, count: int, progress: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = time.perf_counter() + 0.2
        tasks = []
        for number in range(count):
            due = start + number / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(self._one(number, due, progress)))
        # Every operation ends by its deadline and one more long poll; this bounds a
        # stuck server.
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=self.DEADLINE_S + self.WAIT_S + 60)
        self.pool.close()
        return {
            "operations": count,
            "connections_opened": self.pool.opened,
            "outcomes": self.outcomes,
            "long_polls_unheld": self.unheld,
            "submit_to_settled_ms": stats.summary_ms(self.e2e),
            "submit_response_ms": stats.summary_ms(self.submit),
            "server_created_to_settled_ms": stats.summary_ms(self.server),
        }


class FloorLoop(OpenLoop):
    """d's floor (--d-floor): the same POSTs at the same rate, each followed by one
    request of the trivial route instead of long polls. Any client learns that a
    transfer settled from a response after the POST's, and no response costs the web
    less than the trivial one; so this loop's POST + GET time, with the workers
    settling the same transfers meanwhile, bounds from below what d can measure."""

    TRIVIAL = client.Request("GET", "/currencies", ())

    async def _operation(self, connection: client.Connection, number: int, due: float) -> None:
        if await self._submit(connection, number, due) is None:
            return
        response = await connection.send(self.TRIVIAL)
        if response.status != 200:
            self._outcome(f"get_{response.status}")
            return
        self.e2e.append(time.perf_counter() - due)
        self._outcome("answered")


def latency(bench: Bench) -> dict[str, Any]:
    config = bench.config
    drain(bench, "before d")
    ingest_result = bench.results["phases"].get("c", {})
    post_rate = ingest_result.get("post", {}).get("requests_per_s")
    rate = config.latency_rate or (config.latency_rate_factor * post_rate if post_rate else 20.0)
    rate = max(rate, 1.0)
    count = max(1, int(rate * config.latency_seconds))
    rounds = warm_auth(bench)
    profiles = [
        (name, _start_profile(bench, name.replace("_", "-"), process.pid))
        for name, process in (("d_worker", bench.worker), ("d_web", bench.web))
    ]
    # The phase's own cpu_s also counts the drains and the auth warm-up (argon2 for every
    # user in every web process): the open loop's CPU alone is what an operation costs.
    cpu_before = bench.meter.sample()
    with ui.bar("d: open-loop submit -> settled", count, "ops") as progress:
        loop = OpenLoop(bench.port, _payers(bench), _payees(bench))
        result = asyncio.run(loop.run(rate, count, progress))
    result["open_loop_cpu_s"] = bench.meter.between(cpu_before, bench.meter.sample())
    for name, profile in profiles:
        if profile is not None:
            bench.results["profiles"][name] = profile.stop()
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
    if config.latency_floor:
        result["floor"] = _latency_floor(bench, rate, count)
    return result


def _latency_floor(bench: Bench, rate: float, count: int) -> dict[str, Any]:
    """FloorLoop at d's rate, right after d on the same stack (see FloorLoop)."""
    cpu_before = bench.meter.sample()
    with ui.bar("d: floor, POST + trivial GET", count, "ops") as progress:
        loop = FloorLoop(bench.port, _payers(bench), _payees(bench))
        result = asyncio.run(loop.run(rate, count, progress))
    result["open_loop_cpu_s"] = bench.meter.between(cpu_before, bench.meter.sample())
    result["post_then_trivial_ms"] = result.pop("submit_to_settled_ms")
    del result["server_created_to_settled_ms"], result["long_polls_unheld"]
    result["drain_after"] = drain(bench, "after d's floor")
    return result


# --- e: reads -------------------------------------------------------------------------------


async def _sequential(port: int, requests: list[client.Request], warmup: int) -> dict[str, Any]:
    connection = client.Connection("127.0.0.1", port)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    try:
        for number, request in enumerate(requests):
            begin = time.perf_counter()
            response = await connection.send(request)
            elapsed = time.perf_counter() - begin
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if number >= warmup:
                latencies.append(elapsed)
    finally:
        connection.close()
    return {"statuses": statuses, "latency_ms": stats.summary_ms(latencies)}


def reads(bench: Bench) -> dict[str, Any]:
    config = bench.config
    drain(bench, "before e")
    total = data.scalar(bench.conn, "SELECT count(*) FROM transfers")
    missing = config.history_total - total
    result: dict[str, Any] = {"transfers_before_load": total}
    if missing > 0:
        rows = data.random_rows(
            bench.users, bench.table, bench.config.currencies, missing,
            random.Random(config.seed + 5),
        )  # fmt: skip
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
    result["plans"] = explain_list_queries(bench.conn)

    payers = _payers(bench)
    rng = random.Random(config.seed + 6)
    per_user = max(1, config.reads // len(payers) + 1)
    visible: list[tuple[loadgen.Payer, int]] = []
    for payer in payers:
        ids = bench.conn.execute(
            "SELECT id FROM transfers WHERE from_user_id = %s ORDER BY random() LIMIT %s",
            (payer.user_id, per_user),
        ).fetchall()
        visible += [(payer, row[0]) for row in ids]
    rng.shuffle(visible)
    result["auth_warmup_rounds"] = warm_auth(bench)
    # A short warm-up on the measuring connection itself (pools, caches, planner).
    warmup = 2 * len(payers)
    get_requests = [
        client.Request(
            "GET",
            f"/users/{payer.user_id}/transfers/{transfer_id}",
            (("Authorization", payer.authorization),),
        )
        for payer, transfer_id in (visible * 2)[: warmup + config.reads]
    ]
    list_requests = [
        client.Request(
            "GET",
            f"/users/{payer.user_id}/transfers?limit=100",
            (("Authorization", payer.authorization),),
        )
        for payer in [payers[i % len(payers)] for i in range(warmup + config.reads)]
    ]
    with ui.bar("e: GET transfer, GET list (100)", 2, "kinds") as progress:
        result["get_transfer"] = asyncio.run(_sequential(bench.port, get_requests, warmup))
        progress.update()
        result["list_100"] = asyncio.run(_sequential(bench.port, list_requests, warmup))
        progress.update()
    result["method"] = (
        f"one keep-alive connection, requests one after another ({config.reads} measured per "
        f"kind after {warmup} warm-up), the {len(payers)} client users in turn"
    )
    return result


def _plan_nodes(plan: dict[str, Any]) -> list[str]:
    nodes = [f"{plan['Node Type']} on {plan.get('Relation Name') or plan.get('Index Name', '')}"]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


def explain_list_queries(conn: psycopg.Connection) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the exact SQL the API runs for its lists and reads,
    on the busiest user of the full table: each must be index range scans whose cost
    follows the page, not the table (no Seq Scan, buffers in the tens)."""
    from sqlalchemy.dialects import postgresql

    from common.accounts import postings_page
    from common.models import Transfer, TransferStatus
    from common.transfers import TransferFilter, transfers_page

    user, payee = conn.execute(
        "SELECT from_user_id, max(to_user_id) FROM transfers GROUP BY from_user_id "
        "ORDER BY count(*) DESC LIMIT 1"
    ).fetchone()
    middle = conn.execute(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY id) FROM transfers "
        "WHERE from_user_id = %s",
        (user,),
    ).fetchone()[0]
    account = conn.execute(
        "SELECT account_id FROM postings GROUP BY account_id ORDER BY count(*) DESC LIMIT 1"
    ).fetchone()[0]
    posting_middle = conn.execute(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY id) FROM postings "
        "WHERE account_id = %s",
        (account,),
    ).fetchone()[0]
    none = TransferFilter()
    # limit 101: the API fetches one row more than the page to know whether a next exists.
    queries = {
        "transfers first page": transfers_page(
            user, none, descending=False, after_id=None, limit=101
        ),
        "transfers middle page, dsc": transfers_page(
            user, none, descending=True, after_id=middle, limit=101
        ),
        "transfers status=settled": transfers_page(
            user,
            TransferFilter(status=TransferStatus.SETTLED),
            descending=False,
            after_id=middle,
            limit=101,
        ),
        "transfers to=payee": transfers_page(
            user, TransferFilter(payee_id=payee), descending=False, after_id=None, limit=101
        ),
        "statement first page": postings_page(account, descending=False, after_id=None, limit=101),
        "statement middle page": postings_page(
            account, descending=True, after_id=posting_middle, limit=101
        ),
        "one transfer": select_transfer(Transfer, middle),
    }
    plans: dict[str, Any] = {}
    for name, query in queries.items():
        sql = str(
            query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        )
        (explained,) = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}").fetchone()
        top = explained[0]
        nodes = _plan_nodes(top["Plan"])
        plans[name] = {
            "execution_ms": round(top["Execution Time"], 3),
            "planning_ms": round(top["Planning Time"], 3),
            "rows": top["Plan"].get("Actual Rows"),
            "shared_buffers_hit_read": [
                top["Plan"].get("Shared Hit Blocks"),
                top["Plan"].get("Shared Read Blocks"),
            ],
            "seq_scan": any(node.startswith("Seq Scan") for node in nodes),
            "nodes": nodes,
            "sql": sql,
        }
    return plans


def select_transfer(model: Any, transfer_id: int) -> Any:
    from sqlalchemy import select

    return select(model).where(model.id == transfer_id)


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
    memory_snapshots = bench.results["memory"]
    # "Warm": after the first phase that made the group work (b for the worker, c for
    # gunicorn): growth from there on is what a leak would look like; growth from the
    # start also counts first-use imports, pools, caches and copy-on-write of preloaded
    # pages in the forked children.
    warm_after = {"worker": "after_b", "web": "after_c"}
    for group in ("web", "worker"):
        start = memory_snapshots["start"][group]
        after = memory_snapshots["after_settlements"][group]
        result[group] = {
            "rss_start_mib": round(start["rss_kib"] / 1024, 1),
            "rss_after_mib": round(after["rss_kib"] / 1024, 1),
            "pss_start_mib": round(start["pss_kib"] / 1024, 1),
            "pss_after_mib": round(after["pss_kib"] / 1024, 1),
            "processes": len(after["processes"]),
            "rss_growth_pct": round(100 * (after["rss_kib"] / start["rss_kib"] - 1), 1),
        }
        warm = memory_snapshots.get(warm_after[group], {}).get(group)
        if warm:
            result[group]["warm_snapshot"] = warm_after[group]
            result[group]["rss_warm_mib"] = round(warm["rss_kib"] / 1024, 1)
            result[group]["rss_growth_since_warm_pct"] = round(
                100 * (after["rss_kib"] / warm["rss_kib"] - 1), 1
            )
    result["final_audit"] = _audit(bench)
    if not result["final_audit"]["ok"]:
        bench.failed = True
    return result


# --- profiles -------------------------------------------------------------------------------


def _start_profile(bench: Bench, name: str, pid: int) -> Any:
    if not bench.config.profile:
        return None
    from bench.profile import Recording

    folder = bench.config.out_dir / f"{bench.stamp}-profiles"
    folder.mkdir(parents=True, exist_ok=True)
    return Recording(name, pid, folder / f"{name}.txt")
