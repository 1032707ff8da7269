"""The benchmark's sizes and switches: the full run, or the quick smoke run."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = "abcdef"
# Project knobs that change what is measured: recorded with every result.
RECORDED_KNOBS = (
    "WEB_CONCURRENCY", "WORKER_CONCURRENCY", "SETTLE_BATCH_SIZE", "SETTLE_GATHER",
    "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "AUTH_CACHE_TTL", "LOGIN_CACHE_TTL", "WEB_THREADS",
    "ARGON2_TIME_COST", "ARGON2_MEMORY_KIB", "LOG_LEVEL",
)  # fmt: skip


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """The full run's sizes by default."""

    mode: str = "full"
    phases: str = PHASES
    pgbench_scale: int = 10  # a
    pgbench_clients: int = 8
    pgbench_seconds: int = 20
    users: int = 1000  # funded users, one account per bench currency each
    currencies: tuple[str, ...] = ("USD",)
    backlog: int = 50_000  # b
    clients: int = 32  # c
    ingest_seconds: float = 20
    warmup_seconds: float = 3
    batch_items: int = 100
    latency_seconds: float = 20  # d, at latency_rate or else factor x c's POST maximum
    latency_rate_factor: float = 0.5
    latency_rate: float | None = None
    history_total: int = 1_000_000  # e
    reads: int = 2000
    settlements: int = 100_000  # f
    web_workers: int = _env_int("WEB_CONCURRENCY")
    worker_processes: int = _env_int("WORKER_CONCURRENCY")
    load_tool: str = "auto"
    keep: bool = False
    out_dir: Path = ROOT / "bench" / "results"
    seed: int = 20261127
    # Longest any wait for the worker pool to drain may take before the phase gives up.
    drain_timeout_s: float = 900.0

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "out_dir": str(self.out_dir), "currencies": list(self.currencies)}


QUICK = {
    "mode": "quick", "pgbench_scale": 1, "pgbench_seconds": 3, "users": 100, "backlog": 300,
    "clients": 8, "ingest_seconds": 2, "warmup_seconds": 1, "batch_items": 20,
    "latency_seconds": 2, "history_total": 5000, "reads": 100, "settlements": 1000,
}  # fmt: skip

# Positive numeric options: (option, Config field, type, help).
SIZES = (
    ("--backlog", "backlog", int, "pending transfers drained in phase b"),
    ("--users", "users", int, "funded users (one account per currency each)"),
    ("--clients", "clients", int, "concurrent keep-alive HTTP clients in c"),
    ("--seconds", "ingest_seconds", float, "length of each measured run of c and d"),
    ("--batch-items", "batch_items", int, "transfers per batch request in c"),
    ("--rate", "latency_rate", float, "open-loop rate of d (default: half of c's max)"),
    ("--history", "history_total", int, "transfers in the table for the reads of e"),
    ("--reads", "reads", int, "requests per read kind in e"),
    ("--settlements", "settlements", int, "settlements before the RSS of f"),
    ("--pgbench-seconds", "pgbench_seconds", int, None),
    ("--pgbench-scale", "pgbench_scale", int, None),
    ("--web-workers", "web_workers", int, "gunicorn workers (WEB_CONCURRENCY)"),
    ("--workers", "worker_processes", int, "Celery worker processes (WORKER_CONCURRENCY)"),
)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="./run.sh bench",
        description="Start Remit's real stack on throwaway servers and measure it "
        "(see bench/README.md).",
    )
    option = parser.add_argument
    option("--quick", action="store_true", help="tiny sizes, short phases (a smoke run, ~1 min)")
    option("--phases", default=PHASES, help="phases to run, e.g. 'ab' (default: all of abcdef)")
    option(
        "--load-tool",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="HTTP load generator for phase c: wrk when installed (auto; apt-get install wrk), "
        "else aiohttp",
    )
    option("--keep", action="store_true", help="keep .run/bench/<run> (data, logs)")
    option("--out", type=Path, help="folder for <timestamp>.json/.png (default bench/results)")
    sizes = parser.add_argument_group("sizes (defaults: the full run's, or --quick's)")
    for name, _, kind, text in SIZES:
        sizes.add_argument(name, type=kind, help=text)
    sizes.add_argument(
        "--currencies",
        help="comma-separated currencies of the transfers (default USD: one hot "
        "commission account, one settler at a time)",
    )
    args = parser.parse_args(argv)

    phases = "".join(p for p in PHASES if p in args.phases.lower())
    if not phases or set(args.phases.lower()) - set(PHASES):
        parser.error(f"--phases takes letters of {PHASES}")
    overrides = {**(QUICK if args.quick else {}), "phases": phases}
    overrides |= {"load_tool": args.load_tool, "keep": args.keep}
    for name, field, _, _ in SIZES:
        if (value := getattr(args, name[2:].replace("-", "_"))) is not None:
            if value <= 0:
                parser.error(f"{name} must be positive")
            overrides[field] = value
    if args.seconds is not None:
        overrides["latency_seconds"] = args.seconds
    if args.currencies:
        overrides["currencies"] = tuple(c.strip().upper() for c in args.currencies.split(","))
    if args.out is not None:
        overrides["out_dir"] = args.out.resolve()
    config = replace(Config(), **overrides)
    if config.users < 2:
        parser.error("--users must be at least 2 (transfers go between users)")
    if config.load_tool == "wrk" and tool_path("wrk") is None:
        parser.error("--load-tool wrk: wrk is not installed (apt-get install wrk)")
    return config


def tool_path(name: str) -> str | None:
    """A command from the venv's bin folder first, then PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)
