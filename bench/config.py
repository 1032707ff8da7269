"""The benchmark's sizes and switches: the full run of the issue, or the quick smoke run."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = "abcdef"
# Project knobs that change what is measured: recorded with every result.
RECORDED_KNOBS = (
    "WEB_CONCURRENCY",
    "WORKER_CONCURRENCY",
    "SETTLE_BATCH_SIZE",
    "SETTLE_GATHER",
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "AUTH_CACHE_TTL",
    "LOGIN_CACHE_TTL",
    "WEB_THREADS",
    "ARGON2_TIME_COST",
    "ARGON2_MEMORY_KIB",
    "LOG_LEVEL",
)


@dataclass(frozen=True)
class Config:
    mode: str
    phases: str
    # (a) pgbench
    pgbench_scale: int
    pgbench_clients: int
    pgbench_seconds: int
    # the population: users with one funded account per bench currency
    users: int
    currencies: tuple[str, ...]
    # (b) settlement backlog
    backlog: int
    # (c) ingest
    clients: int
    ingest_seconds: float
    warmup_seconds: float
    batch_items: int
    # (d) open-loop latency (rate = latency_rate_factor x the measured POST maximum)
    latency_seconds: float
    latency_rate_factor: float
    latency_rate: float | None
    # Also run d's floor (phases.FloorLoop) after d, at d's rate.
    latency_floor: bool
    # (e) reads
    history_total: int
    reads: int
    # (f) memory
    settlements: int
    # processes
    web_workers: int
    worker_processes: int
    load_tool: str
    profile: bool
    keep: bool
    out_dir: Path
    seed: int = 20261127
    # Longest any wait for the worker pool to drain may take before the phase gives up.
    drain_timeout_s: float = 900.0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["currencies"] = list(self.currencies)
        return data


def _cores() -> int:
    return os.cpu_count() or 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else default


FULL = Config(
    mode="full",
    phases=PHASES,
    pgbench_scale=10,
    pgbench_clients=8,
    pgbench_seconds=20,
    users=1000,
    currencies=("USD",),
    backlog=50_000,
    clients=32,
    ingest_seconds=20,
    warmup_seconds=3,
    batch_items=100,
    latency_seconds=20,
    latency_rate_factor=0.5,
    latency_rate=None,
    latency_floor=False,
    history_total=1_000_000,
    reads=2000,
    settlements=100_000,
    web_workers=_env_int("WEB_CONCURRENCY", _cores()),
    worker_processes=_env_int("WORKER_CONCURRENCY", _cores()),
    load_tool="auto",
    profile=False,
    keep=False,
    out_dir=ROOT / "bench" / "results",
)

QUICK = replace(
    FULL,
    mode="quick",
    pgbench_scale=1,
    pgbench_seconds=3,
    users=100,
    backlog=300,
    clients=8,
    ingest_seconds=2,
    warmup_seconds=1,
    batch_items=20,
    latency_seconds=2,
    history_total=5000,
    reads=100,
    settlements=1000,
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
        "--phases",
        default=PHASES,
        help="which phases to run, e.g. 'ab' (default: all of abcdef)",
    )
    parser.add_argument(
        "--load-tool",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="HTTP load generator for phase c: wrk when installed (auto), or the built-in "
        "asyncio client",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy profiles of the worker (b, d) and of gunicorn (c, d); needs "
        "`pip install py-spy`; the numbers of a profiled run are not the reference",
    )
    parser.add_argument("--keep", action="store_true", help="keep .run/bench/<run> (data, logs)")
    parser.add_argument(
        "--d-floor",
        action="store_true",
        help="after d, the same POSTs at the same rate each followed by one trivial GET "
        "instead of long polls: the least latency d could measure (bench/README)",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for <timestamp>.json/.png (default bench/results)"
    )
    sizes = parser.add_argument_group("sizes (defaults: the issue's, or --quick's)")
    sizes.add_argument("--backlog", type=int, help="pending transfers drained in phase b")
    sizes.add_argument("--users", type=int, help="funded users (one account per currency each)")
    sizes.add_argument(
        "--currencies",
        help="comma-separated currencies of the transfers (default USD: one hot "
        "commission account, one settler at a time)",
    )
    sizes.add_argument("--clients", type=int, help="concurrent keep-alive HTTP clients in c")
    sizes.add_argument("--seconds", type=float, help="length of each measured run of c and d")
    sizes.add_argument("--batch-items", type=int, help="transfers per batch request in c")
    sizes.add_argument("--rate", type=float, help="open-loop rate of d (default: half of c's max)")
    sizes.add_argument("--history", type=int, help="transfers in the table for the reads of e")
    sizes.add_argument("--reads", type=int, help="requests per read kind in e")
    sizes.add_argument("--settlements", type=int, help="settlements before the RSS of f")
    sizes.add_argument("--pgbench-seconds", type=int)
    sizes.add_argument("--pgbench-scale", type=int)
    sizes.add_argument("--web-workers", type=int, help="gunicorn workers (WEB_CONCURRENCY)")
    sizes.add_argument("--workers", type=int, help="Celery worker processes (WORKER_CONCURRENCY)")
    args = parser.parse_args(argv)

    config = QUICK if args.quick else FULL
    phases = "".join(p for p in PHASES if p in args.phases.lower())
    if not phases or set(args.phases.lower()) - set(PHASES):
        parser.error(f"--phases takes letters of {PHASES}")
    overrides: dict[str, object] = {
        "phases": phases,
        "load_tool": args.load_tool,
        "profile": args.profile,
        "keep": args.keep,
        "latency_floor": args.d_floor,
    }
    for option, name in (
        ("backlog", "backlog"),
        ("users", "users"),
        ("clients", "clients"),
        ("seconds", "ingest_seconds"),
        ("batch_items", "batch_items"),
        ("history", "history_total"),
        ("reads", "reads"),
        ("settlements", "settlements"),
        ("pgbench_seconds", "pgbench_seconds"),
        ("pgbench_scale", "pgbench_scale"),
        ("web_workers", "web_workers"),
        ("workers", "worker_processes"),
    ):
        value = getattr(args, option)
        if value is not None:
            if value <= 0:
                parser.error(f"--{option.replace('_', '-')} must be positive")
            overrides[name] = value
    if args.seconds is not None:
        overrides["latency_seconds"] = args.seconds
    if args.rate is not None:
        if args.rate <= 0:
            parser.error("--rate must be positive")
        overrides["latency_rate"] = args.rate
    if args.currencies:
        overrides["currencies"] = tuple(c.strip().upper() for c in args.currencies.split(","))
    if args.out is not None:
        overrides["out_dir"] = args.out.resolve()
    config = replace(config, **overrides)  # type: ignore[arg-type]
    if config.users < 2:
        parser.error("--users must be at least 2 (transfers go between users)")
    if config.profile and shutil.which("py-spy") is None and not _venv_tool("py-spy"):
        parser.error("--profile needs py-spy: pip install py-spy")
    return config


def _venv_tool(name: str) -> Path | None:
    import sys

    candidate = Path(sys.executable).parent / name
    return candidate if candidate.exists() else None


def tool_path(name: str) -> str | None:
    """A command from the venv's bin folder first, then PATH."""
    found = _venv_tool(name)
    return str(found) if found else shutil.which(name)
