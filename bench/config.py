"""The benchmark's sizes and switches: the full run, or the quick smoke run."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The order they run in: i, b's mix, right after b.
PHASES = "abicdefghj"
# Project knobs that change what is measured: recorded with every result.
RECORDED_KNOBS = (
    "WEB_CONCURRENCY", "WORKER_CONCURRENCY", "SETTLE_BATCH_SIZE", "SETTLE_GATHER",
    "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "AUTH_CACHE_TTL", "LOGIN_CACHE_TTL", "WEB_THREADS",
    "ARGON2_TIME_COST", "ARGON2_MEMORY_KIB", "LOG_LEVEL", "WEBHOOK_CONCURRENCY",
    "HASH_CONCURRENCY", "REFUSED_CONNECTION_PAUSE",
)  # fmt: skip


def _cores(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else os.cpu_count() or 1


def size(full: float | None, quick: float | None = None, option: str = "", text: str = "") -> Any:
    """A size: the full run's value, --quick's, and the option that sets it (if any)."""
    return field(default=full, metadata={"quick": quick, "option": option, "help": text})


@dataclass(frozen=True)
class Config:
    """The full run's sizes by default."""

    mode: str = "full"
    phases: str = PHASES
    pgbench_scale: int = size(10, 1, "--pgbench-scale")  # a
    pgbench_clients: int = 8
    pgbench_seconds: int = size(20, 3, "--pgbench-seconds")
    users: int = size(1000, 100, "--users", "funded users (one account per currency each)")
    currencies: tuple[str, ...] = ("USD",)
    backlog: int = size(50_000, 300, "--backlog", "pending transfers drained in phase b")
    clients: int = size(32, 8, "--clients", "concurrent keep-alive HTTP clients in c")
    ingest_seconds: float = size(20, 2, "--seconds", "length of each measured run of c and d")
    warmup_seconds: float = size(3, 1)
    batch_items: int = size(100, 20, "--batch-items", "transfers per batch request in c")
    latency_rate: float = size(100.0, 20.0, "--rate", "transfers per second submitted in d")
    history_total: int = size(1_000_000, 5000, "--history", "transfers in the table in e")
    reads: int = size(2000, 100, "--reads", "requests per read kind in e")
    settlements: int = size(100_000, 1000, "--settlements", "settlements before the RSS of f")
    cold_clients: int = size(1000, 40, "--cold-clients", "new clients per auth scheme in g")
    cold_requests: int = size(3, 3, "--cold-requests", "first requests of each new client in g")
    warm_clients: int = size(100, 8, "--warm-clients", "warm key clients sending g's traffic")
    fanout_backlog: int = size(
        2500, 100, "--fanout-backlog", "transfers settled while h's webhooks worker is paused"
    )
    web_workers: int = size(_cores("WEB_CONCURRENCY"), None, "--web-workers", "gunicorn processes")
    worker_processes: int = size(_cores("WORKER_CONCURRENCY"), None, "--workers", "Celery pool")
    load_tool: str = "auto"
    keep: bool = False
    out_dir: Path = ROOT / "bench" / "results"
    seed: int = 20261127
    drain_timeout_s: float = 900.0


def parse_args(argv: list[str] | None) -> Config:
    about = "Measure Remit's real stack on throwaway servers (see bench/README.md)."
    parser = argparse.ArgumentParser(prog="./run.sh bench", description=about)
    option = parser.add_argument
    option("--quick", action="store_true", help="tiny sizes, short phases (a smoke run, ~1 min)")
    option("--phases", default=PHASES, help="phases to run, e.g. 'ab' (default: all of abicdefghj)")
    tools = ("auto", "wrk", "python")
    option("--load-tool", choices=tools, default="auto", help="phase c's load: wrk, else aiohttp")
    option("--keep", action="store_true", help="keep .run/bench/<run> (data, logs)")
    option("--out", type=Path, help="folder for <timestamp>.json/.png (default bench/results)")
    sizes = parser.add_argument_group("sizes (defaults: the full run's, or --quick's)")
    options = [f for f in fields(Config) if f.metadata.get("option")]
    for f in options:
        name, kind = f.metadata["option"], float if "float" in str(f.type) else int
        metavar = name[2:].upper().replace("-", "_")
        sizes.add_argument(name, dest=f.name, type=kind, metavar=metavar, help=f.metadata["help"])
    sizes.add_argument("--currencies", help="comma-separated currencies (default USD)")
    args = parser.parse_args(argv)

    phases = "".join(p for p in PHASES if p in args.phases.lower())
    if not phases or set(args.phases.lower()) - set(PHASES):
        parser.error(f"--phases takes letters of {PHASES}")
    changes: dict[str, object] = {"phases": phases, "load_tool": args.load_tool, "keep": args.keep}
    if args.quick:
        changes["mode"] = "quick"
        changes |= {f.name: f.metadata["quick"] for f in fields(Config) if f.metadata.get("quick")}
    for f in options:
        if (value := getattr(args, f.name)) is not None:
            if value <= 0:
                parser.error(f"{f.metadata['option']} must be positive")
            changes[f.name] = value
    if args.currencies:
        changes["currencies"] = tuple(c.strip().upper() for c in args.currencies.split(","))
    if args.out is not None:
        changes["out_dir"] = args.out.resolve()
    config = replace(Config(), **changes)
    if config.users < 2:
        parser.error("--users must be at least 2 (transfers go between users)")
    if config.load_tool == "wrk" and not shutil.which("wrk"):
        parser.error("--load-tool wrk: wrk is not installed (apt-get install wrk)")
    return config
