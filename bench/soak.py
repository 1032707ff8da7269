"""`python -m bench.soak` (`./run.sh soak`): the real stack on the bench's throwaway
servers, driven at half its measured capacity with a realistic mix for --minutes; per
minute: throughput, submit -> settled p50/p99, RSS of web, worker and PostgreSQL, the
oldest pending transfer's age, dead tuples in `transfers`; then whether each stayed flat
after the warm-up. Writes bench/results/soak-<time>.json and .png (bench/README.md, "Soak")."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench import load, phases, procs, say, stack
from bench.config import ROOT, Config, _cores
from bench.run import Bench

# The mix: per 100 operations, each kind's share (a seeded shuffle spreads them).
MIX = {
    "transfer": 60,  # POST transfer, long-polled until final
    "refund": 5,  # the payee sends back (all or 1.00 of) a settled transfer it received
    "payout": 5,  # POST payout, long-polled
    "hold": 10,  # POST hold, polled until held, then 2 in 3 captured (polled), 1 in 3 voided
    "read_accounts": 10,  # GET /users/{id}/accounts
    "read_transfers": 10,  # GET /users/{id}/transfers?limit=20
}
MIX_TEXT = (
    "60 % transfers, 5 % refunds, 5 % payouts, 10 % holds (2 in 3 then captured, 1 in 3 "
    "voided), 10 % GET accounts, 10 % GET transfers (limit 20)"
)
# Kinds whose submit -> settled counts in p50/p99: one request, then a transfer to follow.
TIMED = ("transfer", "refund", "payout")
RSS_FLAT_PCT = 5.0
P99_FLAT_PCT = 20.0
GROUPS = ("web", "worker", "postgres")
# What the verdict judges, and what it only records. PostgreSQL's RSS, PSS and USS all
# count shared buffers (USS those one process alone touched): they climb while the cache
# fills. Its private heap (Pss_Anon) is what a leak would grow (docs/decisions/0042).
JUDGED = {
    "rss_web_mib": ("web RSS MiB", RSS_FLAT_PCT),
    "rss_worker_mib": ("worker RSS MiB", RSS_FLAT_PCT),
    "anon_postgres_mib": ("postgres heap (Pss_Anon) MiB", RSS_FLAT_PCT),
    "p99_ms": ("p99 submit->settled ms", P99_FLAT_PCT),
}
RECORDED = {
    "rss_postgres_mib": "postgres RSS MiB",
    "pss_postgres_mib": "postgres PSS MiB",
    "uss_postgres_mib": "postgres USS MiB",
}
FINAL_HOLD = ("rejected", "captured", "voided", "expired")


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 30.0
    rate: float | None = None  # operations/s; None: half the measured capacity
    bucket_seconds: float = 60.0
    capacity_seconds: float = 10.0
    users: int = 200
    clients: int = 50
    web_workers: int = _cores("WEB_CONCURRENCY")
    worker_processes: int = _cores("WORKER_CONCURRENCY")
    out_dir: Path = ROOT / "bench" / "results"
    keep: bool = False
    seed: int = 20261201


def parse_args(argv: list[str] | None) -> SoakConfig:
    about = "Run the real stack at half its capacity for a while; is it flat? (bench/README.md)"
    parser = argparse.ArgumentParser(prog="./run.sh soak", description=about)
    option = parser.add_argument
    option("--minutes", type=float, default=30.0, help="length of the soak (default 30)")
    option("--rate", type=float, help="operations/s (default: half the measured capacity)")
    option("--capacity-seconds", type=float, default=10.0, help="the capacity burst's length")
    option("--users", type=int, default=200, help="funded users; the first --clients send")
    option("--clients", type=int, default=50, help="users sending (and paid by) the mix")
    option("--web-workers", type=int, help="gunicorn processes (default: the core count)")
    option("--workers", type=int, help="Celery pool processes (default: the core count)")
    option("--out", type=Path, help="folder for soak-<time>.json/.png (default bench/results)")
    option("--keep", action="store_true", help="keep .run/bench/<run> (data, logs)")
    # Sub-minute buckets, for the smoke test only.
    option("--bucket-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("minutes", "rate", "capacity_seconds", "bucket_seconds", "users", "clients"):
        if (value := getattr(args, name)) is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.clients < 2 or args.users < args.clients:
        parser.error("--clients must be at least 2 and at most --users")
    config = SoakConfig(
        minutes=args.minutes, rate=args.rate, bucket_seconds=args.bucket_seconds,
        capacity_seconds=args.capacity_seconds, users=args.users, clients=args.clients,
        keep=args.keep,
    )  # fmt: skip
    if args.web_workers:
        config = replace(config, web_workers=args.web_workers)
    if args.workers:
        config = replace(config, worker_processes=args.workers)
    if args.out is not None:
        config = replace(config, out_dir=args.out.resolve())
    return config


def bench_config(config: SoakConfig) -> Config:
    """The bench's Config for its stack (Bench): sizes of the soak, phases unused."""
    return replace(
        Config(), mode="soak", phases="", users=config.users, clients=config.clients,
        web_workers=config.web_workers, worker_processes=config.worker_processes,
        keep=config.keep, out_dir=config.out_dir, seed=config.seed,
    )  # fmt: skip


def capacity(bench: Bench, seconds: float, clients: int) -> dict[str, Any]:
    """Operations of the mix completed per second by `clients` closed loops (each starts
    its next operation when the last is final), the whole stack busy as in the soak."""
    say(f"capacity: the mix in {clients} closed loops for {seconds:g} s")
    mix = Mix(bench, 1.0, seconds, seconds)
    completed, elapsed = asyncio.run(mix.closed(seconds, clients))
    phases.drain(bench)
    return {
        "method": f"the soak's mix, {clients} closed loops, each operation followed to the end",
        "seconds": round(elapsed, 2),
        "operations": completed,
        "outcomes": dict(sorted(mix.outcomes.items())),
        "submit_to_settled_ms": load.summary_ms(mix.latency[0], ("p50", "p99")),
        "operations_per_s": round(completed / elapsed, 1),
    }


class Sampler(threading.Thread):
    """At the end of each bucket: memory of the groups, transfers decided so far, the
    oldest pending age, dead tuples of `transfers` (its own connection, off the loop)."""

    def __init__(self, bench: Bench, start: float, bucket_s: float, buckets: int) -> None:
        super().__init__(name="sampler", daemon=True)
        self.roots = {
            "web": bench.processes["web"].pid,
            "worker": bench.processes["worker"].pid,
            "postgres": bench.pg.postmaster_pid() or 0,
        }
        self.conninfo = bench.pg.conninfo("remit")
        self.start_at, self.bucket_s, self.buckets = start, bucket_s, buckets
        self.samples: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.error: Exception | None = None

    def sample(self, conn: psycopg.Connection) -> dict[str, Any]:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM transfers WHERE status IN ('settled', 'rejected')),"
            " (SELECT count(*) FROM transfers WHERE status = 'pending'),"
            " (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8"
            "  FROM transfers WHERE status = 'pending'),"
            " (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'transfers'),"
            " (SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'transfers'),"
            " (SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'transfers')"
        ).fetchone()
        decided, pending, oldest, dead, live, autovacuums = row or (0, 0, 0.0, 0, 0, 0)
        memory = procs.memory_snapshot(self.roots)
        rss = {group: round(memory[group]["rss_kib"] / 1024, 1) for group in GROUPS}
        pss = {group: round(memory[group]["pss_kib"] / 1024, 1) for group in GROUPS}
        uss = {group: round(memory[group]["uss_kib"] / 1024, 1) for group in GROUPS}
        anon = {group: round(memory[group]["anon_kib"] / 1024, 1) for group in GROUPS}
        processes = {group: len(memory[group]["processes"]) for group in GROUPS}
        return {
            "at_s": round(time.perf_counter() - self.start_at, 1), "decided_total": decided,
            "pending": pending, "oldest_pending_s": round(oldest, 2), "dead_tuples": dead,
            "live_tuples": live, "autovacuums": autovacuums, "rss_mib": rss, "pss_mib": pss,
            "uss_mib": uss, "anon_mib": anon, "processes": processes,
        }  # fmt: skip

    def run(self) -> None:
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                self.samples.append(self.sample(conn))  # the start: the first bucket's base
                for number in range(1, self.buckets + 1):
                    ends = self.start_at + number * self.bucket_s
                    if self.stopping.wait(max(0.0, ends - time.perf_counter())):
                        return
                    self.samples.append(self.sample(conn))
        except Exception as error:  # reported by the caller
            self.error = error


class Mix:
    """The soak's open loop: operations of MIX at a fixed rate, each followed to the end."""

    def __init__(self, bench: Bench, rate: float, seconds: float, bucket_s: float) -> None:
        self.port, self.rate, self.bucket_s = bench.port, rate, bucket_s
        self.payers = bench.payers
        self.by_account = {payer.account: payer for payer in self.payers}
        self.buckets = max(1, round(seconds / bucket_s))  # whole buckets
        self.count = max(1, int(rate * self.buckets * bucket_s))
        rng = self.rng = random.Random(bench.config.seed)
        self.kinds = [kind for kind, share in MIX.items() for _ in range(share)]
        rng.shuffle(self.kinds)
        self.sent = [0] * self.buckets
        self.latency: list[list[float]] = [[] for _ in range(self.buckets)]
        self.outcomes: Counter[str] = Counter()
        self.refundable: deque[tuple[int, int]] = deque(maxlen=5000)  # (payee account, id)
        self.unheld = 0
        self.start = 0.0

    def bucket(self, due: float) -> int:
        return min(int((due - self.start) / self.bucket_s), self.buckets - 1)

    def amount(self) -> str:
        minor = self.rng.randint(100, 9999)
        return f"{minor // 100}.{minor % 100:02d}"

    def payee(self, payer: load.Payer) -> int:
        while (to := self.rng.choice(self.payers).account) == payer.account:
            pass
        return to

    async def post(self, http: aiohttp.ClientSession, payer: load.Payer, url: str,
                   body: dict[str, Any] | None = None) -> tuple[int, Any]:  # fmt: skip
        request = {"method": "POST", "url": url, "headers": {"Authorization": payer.authorization}}
        status, answer, _ = await load.fetch(http, **request, **({"json": body} if body else {}))
        return status, answer

    async def follow(
        self, http: aiohttp.ClientSession, payer: load.Payer, url: str, body: dict, due: float,
        **busy: Any,
    ) -> tuple[int, dict]:  # fmt: skip
        until = due + phases.DEADLINE_S
        answer = await load.follow(http, url, payer, body, until=until, wait=phases.WAIT_S, **busy)
        self.unheld += answer[2]
        return answer[0], answer[1]

    async def money(
        self, http: aiohttp.ClientSession, kind: str, payer: load.Payer, url: str, *,
        body: dict[str, Any], due: float,
    ) -> str:  # fmt: skip
        """POST a transfer-like operation as `payer`, long-poll it until final."""
        status, transfer = await self.post(http, payer, url, body)
        if status != 202:
            return f"post_{status}"
        path = f"/users/{payer.user_id}/transfers/{transfer['id']}"
        status, transfer = await self.follow(http, payer, path, transfer, due)
        if status != 200:
            return f"get_{status}"
        if transfer["status"] == "pending":
            return "still_pending"
        self.latency[self.bucket(due)].append(time.perf_counter() - due)
        if kind == "transfer" and transfer["status"] == "settled":
            self.refundable.append((transfer["to"], transfer["id"]))
        return str(transfer["status"])

    async def hold(self, http: aiohttp.ClientSession, payer: load.Payer, number: int,
                   due: float) -> str:  # fmt: skip
        """A hold, polled until reserved, then captured (polled until settled) or voided."""
        body = {"from": payer.account, "to": self.payee(payer), "amount": self.amount()}
        base = f"/users/{payer.user_id}/holds"
        status, hold = await self.post(http, payer, base, body)
        if status != 202:
            return f"post_{status}"
        url = f"{base}/{hold['id']}"
        status, hold = await self.follow(http, payer, url, hold, due)
        if status != 200 or hold["status"] != "held":
            return f"get_{status}" if status != 200 else f"hold_{hold['status']}"
        if number % 3:
            status, hold = await self.post(http, payer, f"{url}/capture")
            if status != 202:
                return f"capture_post_{status}"
            path = f"/users/{payer.user_id}/transfers/{hold['transfer_id']}"
            status, capture = await self.follow(http, payer, path, {"status": "pending"}, due)
            return f"capture_{capture['status']}" if status == 200 else f"get_{status}"
        status, hold = await self.post(http, payer, f"{url}/void")
        if status != 202:
            return f"void_post_{status}"
        final = lambda h: h["status"] not in FINAL_HOLD  # noqa: E731
        status, hold = await self.follow(http, payer, url, hold, due, busy=final)
        return f"void_{hold['status']}" if status == 200 else f"get_{status}"

    async def operation(self, http: aiohttp.ClientSession, number: int, due: float) -> str:
        kind = self.kinds[number % len(self.kinds)]
        payer = self.payers[number % len(self.payers)]
        self.sent[self.bucket(due)] += 1
        user = f"/users/{payer.user_id}"
        if kind == "refund" and self.refundable:
            account, transfer_id = self.refundable.popleft()
            payee = self.by_account[account]
            body = {} if number % 2 else {"amount": "1.00"}
            url = f"/users/{payee.user_id}/transfers/{transfer_id}/refunds"
            return await self.money(http, kind, payee, url, body=body, due=due)
        if kind == "payout":
            body = {"from": payer.account, "amount": self.amount(), "destination": "soak bank"}
            return await self.money(http, kind, payer, f"{user}/payouts", body=body, due=due)
        if kind == "hold":
            return await self.hold(http, payer, number, due)
        if kind.startswith("read_"):
            url = f"{user}/accounts" if kind == "read_accounts" else f"{user}/transfers?limit=20"
            status, _, _ = await load.fetch(http, **load.get(url, payer))
            return str(status)
        # A transfer (and a refund while no settled transfer is there to refund yet).
        body = {"from": payer.account, "to": self.payee(payer), "amount": self.amount()}
        url = f"{user}/transfers"
        return await self.money(http, "transfer", payer, url, body=body, due=due)

    async def one(self, http: aiohttp.ClientSession, number: int, due: float) -> None:
        kind = self.kinds[number % len(self.kinds)]
        try:
            outcome = await self.operation(http, number, due)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
            outcome = type(error).__name__
        self.outcomes[f"{kind}:{outcome}"] += 1

    async def closed(self, seconds: float, clients: int) -> tuple[int, float]:
        """`clients` loops, each starting the next operation once the last is done, for
        `seconds`: the operations completed and the seconds it took."""
        numbers = itertools.count()
        self.start = started = time.perf_counter()
        end = started + seconds

        async def client(http: aiohttp.ClientSession) -> None:
            while (due := time.perf_counter()) < end:
                await self.one(http, next(numbers), due)

        async with load.session(self.port, limit=phases.CONNECTIONS) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))
        return sum(self.outcomes.values()), time.perf_counter() - started

    async def run(self, started: threading.Event) -> None:
        async with load.session(self.port, limit=phases.CONNECTIONS) as http:
            self.start = time.perf_counter() + 0.2  # load.paced's first due time
            started.set()
            running = await load.paced(self.rate, self.count, lambda n, due: self.one(http, n, due))
            if running:  # a hold's chain is two follows at most, each bounded
                await asyncio.wait_for(asyncio.gather(*running), 2 * phases.DEADLINE_S + 60)


def summarise(mix: Mix, samples: list[dict[str, Any]], bucket_s: float) -> list[dict[str, Any]]:
    """One row per bucket from the sampler's samples (start, then each bucket's end)."""
    rows = []
    for index, (before, after) in enumerate(itertools.pairwise(samples)):
        seconds = max(after["at_s"] - before["at_s"], 1e-3)
        latency = load.summary_ms(mix.latency[index], ("p50", "p99"))
        rows.append({
            "bucket": index + 1, "end_s": after["at_s"],
            "sent_per_s": round(mix.sent[index] / bucket_s, 1),
            "settled_per_s": round((after["decided_total"] - before["decided_total"]) / seconds, 1),
            "submit_to_settled_ms": latency,
            "rss_mib": after["rss_mib"], "pss_mib": after["pss_mib"],
            "uss_mib": after["uss_mib"], "anon_mib": after["anon_mib"],
            "processes": after["processes"],
            "oldest_pending_s": after["oldest_pending_s"],
            "pending": after["pending"], "dead_tuples": after["dead_tuples"],
            "live_tuples": after["live_tuples"], "autovacuums": after["autovacuums"],
        })  # fmt: skip
    return rows


def windows(buckets: int) -> tuple[int, int]:
    """Warm-up buckets (a sixth, at least one) and the width of the windows compared."""
    warmup = max(1, round(buckets / 6)) if buckets > 1 else 0
    return warmup, max(1, min(3, (buckets - warmup) // 3))


def verdicts(mix: Mix, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """First window after the warm-up against the last: flat when each JUDGED memory
    (means) grew by RSS_FLAT_PCT at most and the pooled p99 by P99_FLAT_PCT at most (a
    fall is flat: what a soak hunts is growth)."""
    warmup, width = windows(len(rows))
    first, last = rows[warmup : warmup + width], rows[-width:]
    result: dict[str, Any] = {
        "warmup_buckets": warmup,
        "first_buckets": [row["bucket"] for row in first],
        "last_buckets": [row["bucket"] for row in last],
        "rss_limit_pct": RSS_FLAT_PCT,
        "p99_limit_pct": P99_FLAT_PCT,
    }
    if not first:
        return result | {"flat": None, "note": "too short to compare"}

    def compare(before: float | None, after: float | None, limit: float) -> dict[str, Any]:
        if not before or after is None:
            return {"first": before, "last": after, "change_pct": None, "flat": None}
        change = 100 * (after / before - 1)
        return {"first": round(before, 1), "last": round(after, 1),
                "change_pct": round(change, 1), "flat": change <= limit}  # fmt: skip

    for kind in ("rss", "pss", "uss", "anon"):
        for group in GROUPS:
            key = f"{kind}_{group}_mib"
            means = [sum(row[f"{kind}_mib"][group] for row in part) / len(part)
                     for part in (first, last)]  # fmt: skip
            result[key] = compare(*means, RSS_FLAT_PCT) | {"judged": key in JUDGED}
    p99s = [
        load.summary_ms([t for row in part for t in mix.latency[row["bucket"] - 1]], ("p99",))
        for part in (first, last)
    ]
    result["p99_ms"] = compare(p99s[0]["p99"], p99s[1]["p99"], P99_FLAT_PCT) | {"judged": True}
    if len(rows) < warmup + 2 * width:
        result["note"] = "the windows overlap: too short for a verdict that means much"
    judged = [result[key]["flat"] for key in JUDGED]
    result["flat"] = None if None in judged else all(judged)
    return result


def table(result: dict[str, Any]) -> str:
    minutes = result["config"]["bucket_seconds"] / 60
    header = ("min", "sent/s", "settled/s", "p50 ms", "p99 ms", "web RSS", "worker RSS",
              "pg RSS", "pg USS", "pg heap", "oldest pending s", "dead tuples")  # fmt: skip
    lines = [
        f"Remit soak — {result['started_at']}, {result['rate_per_s']:.1f} operations/s "
        f"({result['rate_source']}), {result['machine']['cores']} cores, shared machine; "
        "memory in MiB",
        f"mix: {MIX_TEXT}",
        "  ".join(f"{h:>10}" for h in header),
    ]
    for row in result["buckets"]:
        latency, rss = row["submit_to_settled_ms"], row["rss_mib"]
        cells = (f"{row['bucket'] * minutes:.4g}", row["sent_per_s"], row["settled_per_s"],
                 latency["p50"], latency["p99"], rss["web"], rss["worker"], rss["postgres"],
                 row["uss_mib"]["postgres"], row["anon_mib"]["postgres"], row["oldest_pending_s"],
                 row["dead_tuples"])  # fmt: skip
        lines.append("  ".join(f"{'-' if c is None else c:>10}" for c in cells))
    v = result.get("verdicts") or {}
    if v.get("first_buckets"):
        lines.append(
            f"verdicts: buckets {v['first_buckets']} (after {v['warmup_buckets']} of warm-up) "
            f"against {v['last_buckets']}"
        )
        for key, (label, limit) in JUDGED.items():
            c = v[key]
            word = "-" if c["flat"] is None else "flat" if c["flat"] else "NOT FLAT"
            lines.append(f"  {label:<27} {c['first']} -> {c['last']} ({c['change_pct']} %, "
                         f"limit +{limit:g} %): {word}")  # fmt: skip
        for key, label in RECORDED.items():
            c = v[key]
            lines.append(f"  {label:<27} {c['first']} -> {c['last']} ({c['change_pct']} %): "
                         "recorded, not judged (counts shared buffers)")  # fmt: skip
        overall = "-" if v["flat"] is None else "flat" if v["flat"] else "NOT FLAT"
        lines.append(f"  overall: {overall}" + (f" ({v['note']})" if v.get("note") else ""))
    lines.append(f"outcomes: {json.dumps(result.get('outcomes', {}), sort_keys=True)}")
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    """Six panels over the run, the compared windows shaded."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    rows, minutes = result["buckets"], result["config"]["bucket_seconds"] / 60
    xs = [row["bucket"] * minutes for row in rows]
    figure = Figure(figsize=(15, 8), layout="tight")
    axes = figure.subplots(2, 3).flatten()
    flat = (result.get("verdicts") or {}).get("flat")
    figure.suptitle(
        f"Remit soak {result['started_at']}: {result['rate_per_s']:.1f} ops/s "
        f"({result['rate_source']}); flat after warm-up: {flat}"
    )
    panels = [
        ("throughput (per second)", [("sent", "sent_per_s"), ("settled", "settled_per_s")]),
        ("submit → settled (ms)", [("p50", "submit_to_settled_ms.p50"),
                                   ("p99", "submit_to_settled_ms.p99")]),
        ("memory (MiB)", [*((f"{g} RSS", f"rss_mib.{g}") for g in GROUPS),
                          ("postgres USS", "uss_mib.postgres"),
                          ("postgres heap", "anon_mib.postgres")]),
        ("oldest pending (s)", [("age", "oldest_pending_s")]),
        ("dead tuples in transfers", [("n_dead_tup", "dead_tuples")]),
        ("pending transfers at the sample", [("pending", "pending")]),
    ]  # fmt: skip
    v = result.get("verdicts") or {}
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for label, key in lines:
            values = []
            for row in rows:
                value: Any = row
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                values.append(value)
            ax.plot(xs, values, marker="o", label=label)
        for buckets, color in ((v.get("first_buckets"), "#2a7"), (v.get("last_buckets"), "#a27")):
            if buckets:
                ax.axvspan(
                    (buckets[0] - 1) * minutes, buckets[-1] * minutes, color=color, alpha=0.1
                )
        ax.set(title=title, xlabel="minutes")
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=90)


def soak(bench: Bench, config: SoakConfig, result: dict[str, Any]) -> None:
    # Transfers go between the sending users only: any payee may refund what it received.
    bench.payees = tuple(payer.account for payer in bench.payers)
    schedule = bench.folder / "beat-schedule"
    bench.processes["beat"] = stack.start("beat", bench.env, bench.logs, schedule=schedule)
    result["auth_warmup_rounds"] = phases.warm_auth(bench)
    if config.rate is None:
        measured = capacity(bench, config.capacity_seconds, 2 * config.clients)
        result["capacity"] = measured
        rate, result["rate_source"] = measured["operations_per_s"] / 2, "half the measured capacity"
    else:
        rate, result["rate_source"] = config.rate, "--rate"
    result["rate_per_s"] = rate = max(rate, 0.1)
    seconds = config.minutes * 60
    mix = Mix(bench, rate, seconds, config.bucket_seconds)
    say(f"soak: {mix.count:,} operations at {rate:.1f}/s for {config.minutes:g} min ({MIX_TEXT})")
    started = threading.Event()
    errors: list[BaseException] = []

    def run_load() -> None:
        try:
            asyncio.run(mix.run(started))
        except BaseException as error:  # reported below
            errors.append(error)
            started.set()

    loop = threading.Thread(target=run_load, name="load", daemon=True)
    loop.start()
    started.wait(60)
    sampler = Sampler(bench, mix.start, config.bucket_seconds, mix.buckets)
    sampler.start()
    try:
        while loop.is_alive():  # joined in steps: SIGINT still reaches this thread
            loop.join(1)
        sampler.join(config.bucket_seconds + 30)
    finally:
        sampler.stopping.set()  # when interrupted; done by now otherwise
    if errors:
        raise RuntimeError(f"the load failed: {errors[0]!r}")
    if sampler.error is not None:
        raise RuntimeError(f"the sampler failed: {sampler.error!r}")
    result["operations"] = mix.count
    result["outcomes"] = dict(sorted(mix.outcomes.items()))
    result["long_polls_unheld"] = mix.unheld
    result["buckets"] = rows = summarise(mix, sampler.samples, config.bucket_seconds)
    result["verdicts"] = verdicts(mix, rows)
    result["drain_after"] = phases.drain(bench)
    result["audit"] = phases._audit(bench)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    bench = Bench(bench_config(config))
    result = bench.results | {"kind": "soak", "mix": MIX_TEXT, "rate_per_s": 0.0,
                              "rate_source": "-", "buckets": []}  # fmt: skip
    result["config"] = {
        "minutes": config.minutes, "rate": config.rate, "bucket_seconds": config.bucket_seconds,
        "capacity_seconds": config.capacity_seconds, "users": config.users,
        "clients": config.clients, "web_workers": config.web_workers,
        "worker_processes": config.worker_processes,
    }  # fmt: skip
    for key in ("phases", "memory"):
        result.pop(key, None)
    interrupted = False
    try:
        bench.start_servers()
        bench.start_stack()
        result["servers"], result["knobs"] = bench.results["servers"], bench.results["knobs"]
        soak(bench, config, result)
        bench.failed |= not result["audit"]["ok"]
    except KeyboardInterrupt:
        interrupted = bench.failed = True
        say("interrupted: stopping everything")
    except Exception as error:
        result["error"] = bench.fail("soak", error)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("stopping the stack and the servers")
        bench.stop()
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ok"] = not bench.failed
    config.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = config.out_dir / f"soak-{bench.stamp}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    try:
        chart(result, json_path.with_suffix(".png"))
    except Exception as error:
        say(f"chart not drawn: {error!r}")
    print(table(result), flush=True)
    say(f"results: {json_path} and {json_path.with_suffix('.png').name}")
    if bench.failed or config.keep:
        say(f"kept {bench.folder} and {bench.pg.folder} (logs, data)")
    else:
        for folder in (bench.folder, bench.pg.folder):
            shutil.rmtree(folder, ignore_errors=True)
    return 130 if interrupted else 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
