"""The phases a-j; each returns its JSON section (bench.run times them)."""

from __future__ import annotations

import asyncio
import http.client
import random
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import redis
from aiohttp import BasicAuth, web
from standardwebhooks import Webhook as Signer
from standardwebhooks import WebhookVerificationError

from bench import data, load, say, stack
from ops.servers import free_port

if TYPE_CHECKING:
    from bench.run import Bench


def _queue_busy(bench: Bench) -> int:
    """Doorbells waiting in Redis plus those a worker has taken and not yet acknowledged."""
    with redis.Redis.from_url(bench.env["REDIS_URL"]) as connection:
        return int(connection.llen("celery")) + int(connection.hlen("unacked"))


def _ring_all(bench: Bench, times: int = 1) -> None:
    from common.doorbells import ring

    for _ in range(times):
        if not all(ring(code) for code in bench.config.currencies):
            raise RuntimeError("the doorbell could not be published")


def wait_for_zero(count: Callable[[], int], timeout: float, series: list | None = None) -> float:
    """Poll `count()` every 0.1 s until 0; the seconds it took (samples go to `series`)."""
    started = time.perf_counter()
    while True:
        left, elapsed = count(), time.perf_counter() - started
        if series is not None:
            series.append([round(elapsed, 2), left])
        if not left:
            return elapsed
        if elapsed > timeout:
            raise RuntimeError(f"{left} transfers or doorbells still queued after {timeout:.0f} s")
        time.sleep(0.1)


def drain(bench: Bench, rings: int = 0) -> dict[str, Any]:
    """Ring `rings` times, then wait until nothing is pending and no doorbell is queued;
    how long each took."""
    _ring_all(bench, rings)
    timeout, pending = bench.config.drain_timeout_s, data.pending_count(bench.conn)
    seconds = wait_for_zero(lambda: data.pending_count(bench.conn), timeout)
    return {
        "pending_at_start": pending,
        "pending_drained_s": round(seconds, 2),
        "doorbells_queued_after": _queue_busy(bench),
        "doorbells_drained_s": round(wait_for_zero(lambda: _queue_busy(bench), timeout), 2),
    }


def _audit(bench: Bench) -> dict[str, Any]:
    """common.audit's checks in one REPEATABLE READ snapshot, as `./run.sh audit`."""
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


def _insert(
    bench: Bench, count: int, seed: int, at: datetime | None = None, ids: tuple = ()
) -> tuple:
    """`count` random transfers between users `ids` (default: all), pending or settled `at`."""
    say(f"  inserting {count:,} {'settled' if at else 'pending'} transfers")
    users, codes = list(ids) or [user.id for user in bench.users], bench.config.currencies
    return data.insert_random(bench.conn, users, codes, count, seed=seed, settled_from=at)


def warm_auth(bench: Bench, payers: tuple[load.Payer, ...] = ()) -> int:
    """Fill every web process's auth cache: rounds of one request per user on new
    connections until three in a row beat an argon2 verification; how many rounds."""
    threshold = max(0.015, 0.6 * bench.verify_s)
    requests = [load.get(f"/users/{p.user_id}/accounts", p) for p in payers or bench.payers]

    async def rounds() -> int:
        count = fast = 0
        async with load.session(bench.port, force_close=True) as http:
            while count < 30 and fast < 3:
                count += 1
                answers = await load.run_sessions(http, ([r] for r in requests), 4)
                if any(status != 200 for _, status, _ in answers):
                    raise RuntimeError(f"auth warm-up: unexpected statuses {answers}")
                fast = fast + 1 if max(s for *_, s in answers) < threshold else 0
        return count

    return asyncio.run(rounds())


def pgbench(bench: Bench) -> dict[str, Any]:
    """TPC-B-like pgbench on the same server: the reference for phase b."""
    config = bench.config
    command = [str(bench.pg.bin / "pgbench")]
    bench.pg.create_database("pgbench")
    target = ["-h", "127.0.0.1", "-p", str(bench.pg.port), "-U", "postgres", "pgbench"]
    say(f"  pgbench -i -s {config.pgbench_scale}")
    init = [*command, "-i", "-q", "-s", str(config.pgbench_scale), *target]
    subprocess.run(init, check=True, capture_output=True)
    command += [
        "-c", str(config.pgbench_clients),
        "-j", str(min(config.pgbench_clients, bench.results["machine"]["cores"] or 1)),
        "-T", str(config.pgbench_seconds), "-P", "1", *target,
    ]  # fmt: skip
    say(f"  pgbench TPC-B-like, {config.pgbench_seconds} s")
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", run.stdout)
    if run.returncode != 0 or tps is None:
        raise RuntimeError(f"pgbench failed: {run.stdout[-2000:]}")
    latency = re.search(r"latency average = ([\d.]+) ms", run.stdout)
    progress = re.findall(r"progress: \S+ s, ([\d.]+) tps", run.stderr)
    return {
        "tps": round(float(tps.group(1)), 1),
        "latency_avg_ms": float(latency.group(1)) if latency else None,
        "scale": config.pgbench_scale,
        "clients": config.pgbench_clients,
        "seconds": config.pgbench_seconds,
        "tps_per_second": [float(x) for x in progress],
        "command": " ".join(["pgbench", *command[1:]]),
    }


def settlement(bench: Bench) -> dict[str, Any]:
    from common.settings import DEFAULT_SETTLE_BATCH_SIZE

    config = bench.config
    # Doorbells with nothing to settle warm every pool process up before the clock starts.
    drain(bench, rings=2 * config.worker_processes)
    ids = _insert(bench, config.backlog, config.seed)
    seconds, series, cpu = _timed_drain(bench, lambda: data.pending_count(bench.conn))
    settled, rejected, failed, span = bench.conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'settled'), "
        "count(*) FILTER (WHERE status = 'rejected'), count(*) FILTER (WHERE status = 'failed'), "
        "extract(epoch FROM max(settled_at) - min(settled_at))::float8 "
        "FROM transfers WHERE id BETWEEN %s AND %s",
        ids,
    ).fetchone()
    result: dict[str, Any] = {
        "backlog": config.backlog,
        "currencies": list(config.currencies),
        "settled": settled,
        "rejected": rejected,
        "failed": failed,
        "seconds": round(seconds, 2),
        "settled_per_s": round((settled + rejected) / seconds, 1),
        "server_side_per_s": round((settled + rejected) / span, 1) if span else None,
        "batch_size": int(bench.env.get("SETTLE_BATCH_SIZE") or DEFAULT_SETTLE_BATCH_SIZE),
        "pending_over_time": series,
    }
    return _against_pgbench(bench, result, cpu, settled + rejected)


Drain = tuple[float, list[list[float]], dict[str, float]]  # seconds, samples, CPU split


def _timed_drain(bench: Bench, left: Callable[[], int]) -> Drain:
    """Ring once and poll `left()` until 0: the seconds from the doorbell, the samples,
    the CPU split of the drain alone."""
    series: list[list[float]] = []
    say("  settling the backlog")
    before, started = bench.meter.sample(), time.perf_counter()
    _ring_all(bench)
    wait_for_zero(left, bench.config.drain_timeout_s, series)
    seconds = time.perf_counter() - started
    return seconds, series, bench.meter.between(before, bench.meter.sample())


def _against_pgbench(
    bench: Bench, result: dict[str, Any], cpu: dict[str, float], done: int
) -> dict[str, Any]:
    """settled/s as a ratio to a's tps, the drain's CPU per operation (steadier than
    settled/s on a shared machine); then the queue drained and the ledger audited."""
    if reference := bench.results["phases"].get("a", {}).get("tps"):
        result["ratio_to_pgbench"] = round(result["settled_per_s"] / reference, 2)
    result["drain_cpu_s"] = cpu
    per_operation = 1000 * (cpu["worker"] + cpu["postgres"]) / max(done, 1)
    result["worker_and_postgres_cpu_ms_per_operation"] = round(per_operation, 3)
    result["queue"] = drain(bench)
    result["audit"] = _audit(bench)
    return result


# Phase i's work left: transfers of any kind pending, holds to reserve, voids to apply.
_MIX_LEFT = (
    "SELECT (SELECT count(*) FROM transfers WHERE status = 'pending') + (SELECT count(*)"
    " FROM holds WHERE status = 'pending' OR (status = 'held' AND void_requested_at IS NOT NULL))"
)
_MIX_OUTCOMES = (
    "SELECT kind, status, count(*) FROM transfers WHERE id BETWEEN %s AND %s GROUP BY 1, 2"
    " UNION ALL SELECT 'hold', status, count(*) FROM holds WHERE id BETWEEN %s AND %s"
    " GROUP BY 1, 2"
)


def mix(bench: Bench) -> dict[str, Any]:
    """b with issue 16's mix: 70 % transfers, 10 % captures (full or part) or voids of held
    holds, 10 % refunds (full or part) of settled transfers, 10 % payouts."""
    config, conn = bench.config, bench.conn
    users, count = [user.id for user in bench.users], config.backlog
    share = count // 10 + 2  # holds to capture or void, transfers to refund
    drain(bench, rings=2 * config.worker_processes)
    originals = _insert(bench, share, config.seed + 9, at=datetime.now(UTC))
    bench.loaded += share
    say(f"  reserving {share:,} holds")
    holds = data.insert_holds(conn, users, config.currencies, share, config.seed + 10)
    left = lambda: data.scalar(conn, _MIX_LEFT)  # noqa: E731
    _ring_all(bench)
    wait_for_zero(left, config.drain_timeout_s)
    say(f"  inserting a mix of {count:,} pending operations")
    ids = data.insert_mix(conn, users, config.currencies, count, seed=config.seed + 11,
                          holds=holds, originals=originals)  # fmt: skip
    seconds, series, cpu = _timed_drain(bench, left)
    outcomes: dict[str, dict[str, int]] = {}
    for kind, status, n in conn.execute(_MIX_OUTCOMES, (*ids, *holds)).fetchall():
        outcomes.setdefault(kind, {})[status] = n
    # Each transfer row decided counts one (a capture too), and each void applied.
    decided = sum(n for kind, by in outcomes.items() if kind != "hold"
                  for status, n in by.items() if status in ("settled", "rejected"))  # fmt: skip
    operations = decided + outcomes.get("hold", {}).get("voided", 0)
    result: dict[str, Any] = {
        "backlog": count,
        "currencies": list(config.currencies),
        "mix": "70 % transfers, 5 % captures, 5 % voids, 10 % refunds, 10 % payouts",
        "outcomes": outcomes,
        "operations": operations,
        "failed": sum(by.get("failed", 0) for by in outcomes.values()),
        "seconds": round(seconds, 2),
        "settled_per_s": round(operations / seconds, 1),
        "left_over_time": series,
    }
    return _against_pgbench(bench, result, cpu, operations)


def ingest(bench: Bench) -> dict[str, Any]:
    config = bench.config
    tool, version = load.choose_tool(config.load_tool)
    if tool == "python" != config.load_tool:
        say("  wrk is not installed (apt-get install wrk): aiohttp drives c instead")
    payers, payees = bench.payers, bench.payees
    workloads = {
        "trivial": load.Workload("get", "/currencies"),
        "health": load.Workload("get", "/health"),
        "post": load.Workload("post", payers=payers, payees=payees),
        "batch": load.Workload("batch", payers=payers, payees=payees, items=config.batch_items),
    }
    result: dict[str, Any] = {
        "tool": tool,
        "tool_version": version,
        "clients": config.clients,
        "seconds": config.ingest_seconds,
        "workers_paused": True,
        "trivial_endpoint": "GET /currencies (no auth, no query)",
    }
    args = {"port": bench.port, "clients": config.clients, "folder": bench.logs}
    # The worker stops taking doorbells (drained after) so settlement takes no API CPU.
    first_id = data.scalar(bench.conn, "SELECT coalesce(max(id), 0) FROM transfers")
    with stack.paused():
        for name, workload in workloads.items():
            if workload.payers:
                result[f"{name}_auth_warmup_rounds"] = warm_auth(bench)
            say(f"  {name}: {config.warmup_seconds:g} s warm-up, {config.ingest_seconds:g} s")
            load.closed_loop(tool, workload, seconds=config.warmup_seconds, **args)
            # Nothing was pending and the worker is paused: new transfers stay pending.
            before, cpu_before = data.pending_count(bench.conn), bench.meter.sample()
            run = load.closed_loop(tool, workload, seconds=config.ingest_seconds, **args)
            run["cpu_s"] = bench.meter.between(cpu_before, bench.meter.sample())
            if workload.payers:
                # Committed within the window (a batch commits its items together).
                run["transfers_committed"] = data.pending_count(bench.conn) - before
                run["transfers_per_s"] = round(run["transfers_committed"] / run["seconds"], 1)
            result[name] = run
        # Should be 0: a doorbell taken before the pause would have settled meanwhile.
        sql = "SELECT count(*) FROM transfers WHERE id > %s AND status <> 'pending'"
        result["settled_while_paused"] = data.scalar(bench.conn, sql, (first_id,))
    trivial = result["trivial"]["requests_per_s"]
    result["ratio_post_to_trivial"] = round(result["post"]["requests_per_s"] / trivial, 3)
    result["ratio_batch_to_trivial"] = round(result["batch"]["transfers_per_s"] / trivial, 3)
    after = result["drain_after"] = drain(bench, rings=1)
    if after["pending_at_start"] and after["pending_drained_s"]:
        after["settled_per_s"] = round(after["pending_at_start"] / after["pending_drained_s"], 1)
    return result


WAIT_S = 10  # the long polls' ?wait=
DEADLINE_S = 3 * WAIT_S  # still pending this long after it was due: "still_pending"
CONNECTIONS = 512  # at most: an operation beyond waits for one, within its latency


async def open_loop(bench: Bench, follow: bool = True) -> dict[str, Any]:
    """Transfers sent at --rate for --seconds whatever the answers, each long-polled until
    final (unless not `follow`); latency counts from when it was due (no coordinated omission)."""
    rate, payers = bench.config.latency_rate, bench.payers
    count = max(1, int(rate * bench.config.ingest_seconds))
    say(f"  {count:,} transfers at {rate:.1f}/s, {'each long-polled' if follow else 'no polls'}")
    workload = load.Workload("post", payers=payers, payees=bench.payees)
    build = load.request_builder(workload, random.Random(7))
    e2e: list[float] = []
    submit: list[float] = []
    server: list[float] = []
    outcomes, counts = Counter[str](), Counter[str]()  # counts: connections opened, polls unheld

    async def operation(http: aiohttp.ClientSession, number: int, due: float) -> str:
        payer = payers[number % len(payers)]
        status, transfer, _ = await load.fetch(http, **build(number))
        if status != 202:
            return f"post_{status}"
        submit.append(time.perf_counter() - due)
        if follow:
            url = f"/users/{payer.user_id}/transfers/{transfer['id']}"
            until = due + DEADLINE_S
            answer = await load.follow(http, url, payer, transfer, until=until, wait=WAIT_S)
            status, transfer, unheld = answer
            counts["unheld"] += unheld
            if status != 200:
                return f"get_{status}"
        if transfer["status"] == "pending":
            return "still_pending" if follow else "accepted"
        e2e.append(time.perf_counter() - due)
        if (created := transfer.get("created_at")) and (settled := transfer.get("settled_at")):
            span = datetime.fromisoformat(settled) - datetime.fromisoformat(created)
            server.append(span.total_seconds())
        return transfer["status"]

    async def one(http: aiohttp.ClientSession, number: int, due: float) -> None:
        try:
            outcomes[await operation(http, number, due)] += 1
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            outcomes[type(error).__name__] += 1

    async def opened(*_: object) -> None:
        counts["opened"] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(opened)
    async with load.session(bench.port, limit=CONNECTIONS, traces=[trace]) as http:
        tasks = await load.paced(rate, count, lambda number, due: one(http, number, due))
        # Every operation ends by its deadline plus one long poll: a bound on a stuck server.
        await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S + WAIT_S + 60)
    return {
        "operations": count,
        "connections_opened": counts["opened"],
        "outcomes": dict(outcomes),
        "long_polls_unheld": counts["unheld"],
        "submit_to_settled_ms": load.summary_ms(e2e),
        "submit_response_ms": load.summary_ms(submit),
        "server_created_to_settled_ms": load.summary_ms(server),
    }


def latency(bench: Bench) -> dict[str, Any]:
    rounds = warm_auth(bench)
    # The open loop's CPU alone, without the drains and the auth warm-up (argon2).
    cpu_before = bench.meter.sample()
    result = asyncio.run(open_loop(bench))
    result["open_loop_cpu_s"] = bench.meter.between(cpu_before, bench.meter.sample())
    result |= {"auth_warmup_rounds": rounds, "rate_per_s": round(bench.config.latency_rate, 1)}
    result |= {"seconds": bench.config.ingest_seconds, "wait_param_s": WAIT_S}
    result["drain_after"] = drain(bench)
    return result


async def _sequential(port: int, requests: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One request after another on one keep-alive connection; the first `warmup` untimed."""
    async with load.session(port, limit=1) as http:
        answers = await load.run_sessions(http, [requests], 1)
    statuses = Counter(status for _, status, _ in answers)
    latencies = [took for place, _, took in answers if place >= warmup]
    return {"statuses": dict(statuses), "latency_ms": load.summary_ms(latencies)}


def reads(bench: Bench) -> dict[str, Any]:
    config = bench.config
    total = data.scalar(bench.conn, "SELECT count(*) FROM transfers")
    missing = config.history_total - total
    result: dict[str, Any] = {"transfers_before_load": total}
    if missing > 0:
        started = time.perf_counter()
        _insert(bench, missing, config.seed + 5, datetime.now(UTC) - timedelta(days=2))
        bench.loaded += missing
        result["history_loaded"] = missing
        result["history_load_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    say("  VACUUM ANALYZE (as autovacuum would have, for a table of that age)")
    for table in ("transfers", "postings", "accounts"):
        bench.conn.execute(f"VACUUM ANALYZE {table}")
    result["vacuum_analyze_s"] = round(time.perf_counter() - started, 1)
    result["transfers_in_table"] = data.scalar(bench.conn, "SELECT count(*) FROM transfers")
    result["postings_in_table"] = data.scalar(bench.conn, "SELECT count(*) FROM postings")

    payers = bench.payers
    by_user = {payer.user_id: payer for payer in payers}
    # Random transfers of each client user, as many as the reads need.
    visible = bench.conn.execute(
        "SELECT from_user_id, id FROM (SELECT from_user_id, id, row_number() OVER "
        "(PARTITION BY from_user_id ORDER BY random()) AS n FROM transfers "
        "WHERE from_user_id = ANY(%s)) AS s WHERE n <= %s",
        (list(by_user), config.reads // len(payers) + 1),
    ).fetchall()
    random.Random(config.seed + 6).shuffle(visible)
    result["auth_warmup_rounds"] = warm_auth(bench)
    # A short warm-up on the measuring connection itself (pools, caches, planner).
    warmup = 2 * len(payers)
    gets = [
        load.get(f"/users/{user_id}/transfers/{transfer_id}", by_user[user_id])
        for user_id, transfer_id in (visible * 2)[: warmup + config.reads]
    ]
    lists = [
        load.get(f"/users/{payer.user_id}/transfers?limit=100", payer)
        for payer in (payers[i % len(payers)] for i in range(warmup + config.reads))
    ]
    say(f"  {config.reads:,} GET transfer, then {config.reads:,} GET list (100)")
    for kind, requests in (("get_transfer", gets), ("list_100", lists)):
        result[kind] = asyncio.run(_sequential(bench.port, requests, warmup))
    result["method"] = f"sequential on one connection, {warmup} warm-up, {len(payers)} users"
    return result


def _decided_by_worker(bench: Bench) -> int:
    """Transfers the worker settled or rejected (not those written here as settled)."""
    sql = "SELECT count(*) FROM transfers WHERE status IN ('settled', 'rejected')"
    return data.scalar(bench.conn, sql) - bench.loaded


def memory(bench: Bench) -> dict[str, Any]:
    config = bench.config
    decided = _decided_by_worker(bench)
    result: dict[str, Any] = {"settlements_before_top_up": decided}
    if decided < config.settlements:
        missing = config.settlements - decided
        _insert(bench, missing, config.seed + 7)
        result["top_up"] = drain(bench, rings=1)
        result["top_up_transfers"] = missing
    result["settlements"] = _decided_by_worker(bench)
    bench.remember_memory("after_settlements")
    snapshots = bench.results["memory"]
    # Growth since "warm" is what a leak looks like; since the start, first-use costs too.
    warm_after = {"worker": "after_b", "web": "after_c"}
    for group in ("web", "worker"):
        start, after = snapshots["start"][group], snapshots["after_settlements"][group]
        section = result[group] = {
            f"{kind}_{when}_mib": round(snapshot[f"{kind}_kib"] / 1024, 1)
            for kind in ("rss", "pss")
            for when, snapshot in (("start", start), ("after", after))
        }
        section |= {
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


def _new_clients(bench: Bench, count: int, prefix: str, keys: bool) -> tuple[load.Payer, ...]:
    """`count` funded users no web process has seen, each with Basic credentials or an API
    key (stored as the API stores them: argon2id hash, SHA-256 digest)."""
    from common.api_keys import PREFIX_LENGTH, digest_of, new_secret

    code = bench.config.currencies[0]
    users = data.create_users(bench.conn, count, bench.password_hash, prefix)
    bench.loaded += data.fund(bench.conn, [user.id for user in users], (code,), 1000)
    auth = [BasicAuth(user.username, bench.password).encode() for user in users]
    if keys:
        auth = [new_secret() for _ in users]
        rows = [(u.id, s[:PREFIX_LENGTH], digest_of(s)) for u, s in zip(users, auth, strict=True)]
        data.insert_rows(bench.conn, "api_keys", rows)
        auth = [f"Bearer {secret}" for secret in auth]
    return tuple(load.Payer(u.id, a, u.accounts[code]) for u, a in zip(users, auth, strict=True))


async def _sessions(bench: Bench, payers: tuple[load.Payer, ...], each: int) -> dict:
    """A session per payer (a client, maybe again): `each` POST transfers one after another,
    --clients sessions at a time on as many keep-alive connections."""
    workload = load.Workload("post", payers=payers, payees=bench.payees)
    build = load.request_builder(workload, random.Random(len(payers)))
    sessions = ([build(number) for _ in range(each)] for number in range(len(payers)))
    started = time.perf_counter()
    async with load.session(bench.port, limit=bench.config.clients) as http:
        answers = await load.run_sessions(http, sessions, bench.config.clients)
    seconds, requests = time.perf_counter() - started, len(payers) * each
    times: tuple[list[float], list[float]] = ([], [])  # a session's first request, the later
    for place, _, took in answers:
        times[bool(place)].append(took)
    return {"clients": len(set(payers)), "sessions": len(payers), "requests_per_client": each,
            "requests": requests, "seconds": round(seconds, 2),
            "requests_per_s": round(requests / seconds, 1),
            "statuses": dict(Counter(status for _, status, _ in answers)),
            "first_request_ms": load.summary_ms(times[0]),
            "later_requests_ms": load.summary_ms(times[1])}  # fmt: skip


ROUNDS = 3  # of the key runs, alternated: each is short, the median is reported


def cold_start(bench: Bench) -> dict[str, Any]:
    """New clients' first requests with Basic, then, alternated, with new keys and the same
    sessions from warm keys (1,000 distinct users, or 100 of them in turn)."""
    config = bench.config
    cold, each, warm = config.cold_clients, config.cold_requests, config.warm_clients
    say(f"  loading {(ROUNDS + 1) * cold + warm:,} new users, all but {cold:,} with an API key")
    basic = _new_clients(bench, cold, "cold_basic_", keys=False)
    fresh = [_new_clients(bench, cold, f"cold_key{n}_", keys=True) for n in range(ROUNDS)]
    regulars = _new_clients(bench, warm, "warm_key_", keys=True)
    runs: dict[str, list[dict[str, Any]]] = {"basic_cold": [], "keys_cold": [], "keys_warm": []}

    def measure(name: str, payers: tuple[load.Payer, ...]) -> None:
        say(f"  {name}: {len(set(payers)):,} clients, {len(payers):,} sessions of {each} POSTs")
        before = bench.meter.sample()
        run = asyncio.run(_sessions(bench, payers, each))
        cpu = run["cpu_s"] = bench.meter.between(before, bench.meter.sample())
        # Steadier than req/s on a shared machine.
        per_request = 1000 * (cpu["web"] + cpu["postgres"]) / run["requests"]
        runs[name].append(run | {"web_and_postgres_cpu_ms_per_request": round(per_request, 3)})

    with stack.paused():
        measure("basic_cold", basic)
        for payers in fresh:
            measure("keys_cold", payers)
            warm_auth(bench, regulars)  # a key's cache entry lives LOGIN_CACHE_TTL (10 s)
            measure("keys_warm", tuple(regulars[n % warm] for n in range(cold)))
    result: dict[str, Any] = {"method": "POST /users/{id}/transfers; worker paused, drained after"}
    for name, done in runs.items():
        middle = sorted(done, key=lambda run: run["requests_per_s"])[len(done) // 2]
        result[name] = middle | {"rounds_per_s": [run["requests_per_s"] for run in done]}
    rate = {name: result[name]["requests_per_s"] for name in runs}
    result["ratio_keys_to_basic"] = round(rate["keys_cold"] / rate["basic_cold"], 2)
    # Each round's cold run against the warm run right after it: moments apart.
    pairs = zip(runs["keys_cold"], runs["keys_warm"], strict=True)
    paired = sorted(c["requests_per_s"] / w["requests_per_s"] for c, w in pairs)
    result["ratio_cold_to_warm_keys"] = round(paired[len(paired) // 2], 3)
    result["drain_after"] = drain(bench, rings=1)
    return result


class Receiver:
    """Webhook deliveries' receiver (aiohttp.web on a loop in a thread of its own): every
    signature verified as a receiver would (standardwebhooks), and the first arrival of
    each webhook-id kept with its event."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets  # path -> its webhook's secret
        self.first: dict[str, tuple[float, dict[str, Any]]] = {}
        self.statuses: Counter[int] = Counter()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="receiver", daemon=True)
        self.ready = threading.Event()
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the webhook receiver did not start")

    async def _handle(self, request: web.Request) -> web.Response:
        body, arrived = await request.read(), time.time()
        try:
            event = Signer(self.secrets[request.path]).verify(body, dict(request.headers))
        except (KeyError, WebhookVerificationError):
            self.statuses[400] += 1
            return web.Response(status=400)
        self.statuses[204] += 1
        self.first.setdefault(event["id"], (arrived, event))
        return web.Response(status=204)

    def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/{hook:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _deliveries(bench: Bench, what: str, after: int, receiver: Receiver, started: float) -> dict:
    """Wait until every delivery after id `after` is made: the seconds since `started`,
    their states, and each event's settled_at (its body's) -> first arrival here."""
    timeout = bench.config.drain_timeout_s
    # The transfers settle first: then all their deliveries exist.
    wait_for_zero(lambda: data.pending_count(bench.conn), timeout)
    sql = "SELECT count(*) FROM webhook_deliveries WHERE id > %s AND state = 'pending'"
    wait_for_zero(lambda: data.scalar(bench.conn, sql, (after,)), timeout)
    seconds = time.perf_counter() - started
    states = dict(bench.conn.execute(
        "SELECT state, count(*) FROM webhook_deliveries WHERE id > %s GROUP BY state", (after,)
    ).fetchall())  # fmt: skip
    waits = [
        arrived - datetime.fromisoformat(settled).timestamp()
        for arrived, event in receiver.first.values()
        if (settled := event["data"].get("settled_at"))
    ]
    return {f"{what}_s": round(seconds, 2), "deliveries": states,
            "distinct_webhook_ids_received": len(receiver.first),
            "settled_to_delivered_ms": load.summary_ms(waits)}  # fmt: skip


_LAST_DELIVERY = "SELECT coalesce(max(id), 0) FROM webhook_deliveries"


def _steady(bench: Bench, receiver: Receiver) -> dict[str, Any]:
    """d's open loop without the long polls; every delivery it caused, timed."""
    warm_auth(bench)
    after, before = data.scalar(bench.conn, _LAST_DELIVERY), bench.meter.sample()
    started = time.perf_counter()
    steady = asyncio.run(open_loop(bench, follow=False))
    for key in ("submit_to_settled_ms", "server_created_to_settled_ms", "long_polls_unheld"):
        del steady[key]  # not followed
    steady |= _deliveries(bench, "all_delivered", after, receiver, started)
    return steady | {"cpu_s": bench.meter.between(before, bench.meter.sample())}


def _backlog(bench: Bench, receiver: Receiver) -> dict[str, Any]:
    """Transfers between the payers settled while the delivery worker waits; then the
    deliveries/s of the drain once it consumes again."""
    config = bench.config
    say(f"  {config.fanout_backlog:,} transfers settled while the webhooks worker waits")
    after = data.scalar(bench.conn, _LAST_DELIVERY)
    with stack.paused("webhooks"):
        payers = tuple(payer.user_id for payer in bench.payers)
        _insert(bench, config.fanout_backlog, config.seed + 8, ids=payers)
        _ring_all(bench)
        wait_for_zero(lambda: data.pending_count(bench.conn), config.drain_timeout_s)
        # The settlement worker publishes a batch's deliveries after its commit.
        sql = "SELECT count(*) FROM webhook_deliveries WHERE id > %s"
        made = data.scalar(bench.conn, sql, (after,))
        with redis.Redis.from_url(bench.env["REDIS_URL"]) as connection:
            wait_for_zero(lambda: max(0, made - int(connection.llen("webhooks"))), 60)
            queued = int(connection.llen("webhooks"))
        receiver.first.clear()
        before, resumed = bench.meter.sample(), time.perf_counter()
    backlog = _deliveries(bench, "backlog_drained", after, receiver, resumed)
    del backlog["settled_to_delivered_ms"]  # the pause, mostly
    delivered = backlog["deliveries"].get("delivered", 0)
    return backlog | {
        "cpu_s": bench.meter.between(before, bench.meter.sample()),
        "transfers": config.fanout_backlog,
        "messages_queued": queued,
        "delivered_per_s": round(delivered / max(backlog["backlog_drained_s"], 1e-3), 1),
    }


def fanout(bench: Bench) -> dict[str, Any]:
    """A webhook for each payer, delivered to a receiver here: settled -> delivered at a
    steady rate, then the drain of a backlog. Beat runs for this phase only (its sweeps
    would ring doorbells into the other phases' measurements)."""
    from common.webhooks import new_secret

    receiver = Receiver({f"/hooks/{payer.user_id}": new_secret() for payer in bench.payers})
    url = f"http://127.0.0.1:{receiver.port}"
    hooks = [(int(p.removeprefix("/hooks/")), url + p, s) for p, s in receiver.secrets.items()]
    data.insert_rows(bench.conn, "webhooks", hooks)
    beat = stack.start("beat", bench.env, bench.logs, schedule=bench.folder / "beat-schedule")
    result = {"webhooks": len(bench.payers), "rate_per_s": bench.config.latency_rate}
    try:
        result |= {"steady": _steady(bench, receiver), "backlog": _backlog(bench, receiver)}
    finally:
        beat.stop()
        receiver.stop()
        bench.conn.execute("UPDATE webhooks SET enabled = false")
    return result | {"receiver_statuses": dict(receiver.statuses)}


# --- j: overload ------------------------------------------------------------------------

FLOOD_CLIENTS = 48


def _flood(port: int, seconds: float, prefix: str, out: Any) -> None:
    """In a child process: FLOOD_CLIENTS clients registering new users without pause;
    the statuses they got, sent on `out`."""

    async def client(http: aiohttp.ClientSession, number: int) -> Counter[int]:
        statuses: Counter[int] = Counter()
        deadline, count = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            form = {"username": f"{prefix}{number}_{count}", "password": "flooding password"}
            try:
                async with http.post("/users", data=form) as response:
                    await response.read()
                    statuses[response.status] += 1
            except aiohttp.ClientError:
                statuses[0] += 1
            count += 1
        return statuses

    async def run() -> Counter[int]:
        async with load.session(port, limit=FLOOD_CLIENTS) as http:
            done = await asyncio.gather(*(client(http, n) for n in range(FLOOD_CLIENTS)))
        return sum(done, Counter())

    out.send(dict(asyncio.run(run())))
    out.close()


def _signed_in(port: int, path: str, authorization: str, seconds: float) -> dict[str, Any]:
    """One signed-in client, keep-alive, a GET every 50 ms: latencies and statuses."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        connection.request("GET", path, headers={"Authorization": authorization})
        response = connection.getresponse()
        response.read()
        times.append(time.perf_counter() - started)
        statuses[response.status] += 1
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - started)))
    connection.close()
    return {"statuses": dict(statuses), "latency_ms": load.summary_ms(times)}


def _web_under_flood(bench: Bench, label: str, knobs: dict[str, str]) -> dict[str, Any]:
    """A gunicorn of its own with `knobs`: the signed-in client alone, then under the flood."""
    import multiprocessing

    port = free_port()
    env = bench.env | {"PORT": str(port)} | knobs
    web = stack.Process(
        f"web-j-{label}",
        stack.services.command("web", bind=f"127.0.0.1:{port}"),
        env,
        log=bench.logs / f"web-j-{label}.log",
    )
    web.start()
    try:
        stack.wait_until(web, lambda: stack.http_ok(port), f"gunicorn ({label})")
        payer = bench.payers[0]
        path = f"/users/{payer.user_id}/accounts"
        # Each web process verifies the password once; new connections spread over them.
        for _ in range(10 * bench.config.web_workers):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", path, headers={"Authorization": payer.authorization})
            connection.getresponse().read()
            connection.close()
        seconds = bench.config.ingest_seconds
        quiet = _signed_in(port, path, payer.authorization, seconds)
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        flood = multiprocessing.get_context("fork").Process(
            target=_flood, args=(port, seconds + 2, f"flood_{label}_", send)
        )
        flood.start()
        time.sleep(1)
        loaded = _signed_in(port, path, payer.authorization, seconds)
        statuses = receive.recv()
        flood.join(60)
    finally:
        web.stop()
    registrations = statuses.get(201, 0)
    return {
        "knobs": knobs,
        "quiet": quiet,
        "under_flood": loaded,
        "flood_statuses": statuses,
        "registrations_per_s": round(registrations / (seconds + 2), 1),
    }


def overload(bench: Bench) -> dict[str, Any]:
    """A signed-in client's GET /users/{id}/accounts alone and under 48 clients
    registering without pause: with hashing unbounded (before) and bounded (after)."""
    # The bound per address stops 48 loopback clients at once: raised for the runs that
    # measure the hashing bound, left as deployed in the last.
    raised = {"REGISTRATIONS_PER_ADDRESS": "1000000000"}
    unpaused = {"REFUSED_CONNECTION_PAUSE": "0"}
    # Before: no bound; then the default bound (the process's share of the cores) with
    # refused connections read again at once, then paused as deployed; then every
    # default, the address's limit included.
    bounded = {"HASH_CONCURRENCY": "0"}
    variants = {
        "before_unbounded": raised | unpaused | {"HASH_CONCURRENCY": "100000"},
        "after_default_unpaused": raised | unpaused | bounded,
        "after_default": raised | bounded,
        "per_address_limit": bounded,
    }
    if bench.config.mode == "quick":
        # A smoke run shows the bounds work; the other two only add comparisons.
        del variants["before_unbounded"], variants["after_default_unpaused"]
    runs = {name: _web_under_flood(bench, name, knobs) for name, knobs in variants.items()}
    summary = {
        name: {
            "quiet_p50_p99_ms": [run["quiet"]["latency_ms"][k] for k in ("p50", "p99")],
            "flood_p50_p99_ms": [run["under_flood"]["latency_ms"][k] for k in ("p50", "p99")],
            "registrations_per_s": run["registrations_per_s"],
        }
        for name, run in runs.items()
    }
    return {
        "method": f"{FLOOD_CLIENTS} clients POST /users without pause; one signed-in client "
        "GET /users/{id}/accounts every 50 ms on keep-alive; own gunicorn per variant",
        **runs,
        "summary": summary,
    }


# Each phase's title and function, in the order they run.
ALL: dict[str, tuple[str, Callable[[Bench], dict[str, Any]]]] = {
    "a": ("pgbench TPC-B-like, the reference", pgbench),
    "b": ("settlement throughput (backlog drained by the worker pool)", settlement),
    "i": ("settlement of a mix: transfers, captures, voids, refunds, payouts", mix),
    "c": ("ingest through gunicorn (closed loop)", ingest),
    "d": ("end-to-end latency submit -> settled (open loop, ?wait=)", latency),
    "e": ("read latency with a big transfers table", reads),
    "f": ("worker and web memory after many settlements", memory),
    "g": ("cold start: new clients' first requests, Basic and API keys", cold_start),
    "h": ("webhook fan-out: settled -> delivered, and a backlog's deliveries/s", fanout),
    "j": ("overload: signed-in reads under a registration flood, hashing bounded or not", overload),
}
