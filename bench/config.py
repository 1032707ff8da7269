"""The benchmark's sizes and switches: the full run of the issue, or the quick smoke run."""

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


@dataclass(frozen=True)
class Config:
    mode: str
    phases: str
    pgbench_scale: int  # a
    pgbench_clients: int
    pgbench_seconds: int
    users: int  # funded users, one account per bench currency each
    currencies: tuple[str, ...]
    backlog: int  # b
    clients: int  # c
    ingest_seconds: float
    warmup_seconds: float
    batch_items: int
    latency_seconds: float  # d: rate = latency_rate, else factor x c's POST maximum
    latency_rate_factor: float
    latency_rate: float | None
    history_total: int  # e
    reads: int
    settlements: int  # f
    web_workers: int
    worker_processes: int
    load_tool: str
    keep: bool
    out_dir: Path
    seed: int = 20261127
    # Longest any wait for the worker pool to drain may take before the phase gives up.
    drain_timeout_s: float = 900.0

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["currencies"] = list(self.currencies)
        return data


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else default


FULL = Config(
    mode="full", phases=PHASES, pgbench_scale=10, pgbench_clients=8, pgbench_seconds=20,
    users=1000, currencies=("USD",), backlog=50_000, clients=32, ingest_seconds=20,
    warmup_seconds=3, batch_items=100, latency_seconds=20, latency_rate_factor=0.5,
    latency_rate=None, history_total=1_000_000, reads=2000, settlements=100_000,
    web_workers=_env_int("WEB_CONCURRENCY", os.cpu_count() or 1),
    worker_processes=_env_int("WORKER_CONCURRENCY", os.cpu_count() or 1),
    load_tool="auto", keep=False, out_dir=ROOT / "bench" / "results",
)  # fmt: skip

QUICK = replace(
    FULL, mode="quick", pgbench_scale=1, pgbench_seconds=3, users=100, backlog=300, clients=8,
    ingest_seconds=2, warmup_seconds=1, batch_items=20, latency_seconds=2, history_total=5000,
    reads=100, settlements=1000,
)  # fmt: skip

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
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and short phases (a smoke run, ~1 min)"
    )
    parser.add_argument(
        "--phases", default=PHASES, help="which phases to run, e.g. 'ab' (default: all of abcdef)"
    )
    parser.add_argument(
        "--load-tool",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="HTTP load generator for phase c: wrk when installed (auto; apt-get install wrk), "
        "else aiohttp",
    )
    parser.add_argument("--keep", action="store_true", help="keep .run/bench/<run> (data, logs)")
    parser.add_argument(
        "--out", type=Path, help="folder for <timestamp>.json/.png (default bench/results)"
    )
    sizes = parser.add_argument_group("sizes (defaults: the issue's, or --quick's)")
    for option, _, kind, text in SIZES:
        sizes.add_argument(option, type=kind, help=text)
    sizes.add_argument(
        "--currencies",
        help="comma-separated currencies of the transfers (default USD: one hot "
        "commission account, one settler at a time)",
    )
    args = parser.parse_args(argv)

    phases = "".join(p for p in PHASES if p in args.phases.lower())
    if not phases or set(args.phases.lower()) - set(PHASES):
        parser.error(f"--phases takes letters of {PHASES}")
    overrides: dict[str, object] = {
        "phases": phases,
        "load_tool": args.load_tool,
        "keep": args.keep,
    }
    for option, name, _, _ in SIZES:
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            if value <= 0:
                parser.error(f"{option} must be positive")
            overrides[name] = value
    if args.seconds is not None:
        overrides["latency_seconds"] = args.seconds
    if args.currencies:
        overrides["currencies"] = tuple(c.strip().upper() for c in args.currencies.split(","))
    if args.out is not None:
        overrides["out_dir"] = args.out.resolve()
    config = replace(QUICK if args.quick else FULL, **overrides)  # type: ignore[arg-type]
    if config.users < 2:
        parser.error("--users must be at least 2 (transfers go between users)")
    if config.load_tool == "wrk" and tool_path("wrk") is None:
        parser.error("--load-tool wrk: wrk is not installed (apt-get install wrk)")
    return config


def tool_path(name: str) -> str | None:
    """A command from the venv's bin folder first, then PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)
