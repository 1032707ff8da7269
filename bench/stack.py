"""The run's own PostgreSQL and Redis (ops.servers) and Remit's processes on them, started
as production starts them (ops.services); only the bind address is the bench's (and the
delivery worker's REMIT_ENV, see bench/README.md)."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.config import Config
from ops import services
from ops.supervisor import Process

# Sized for a benchmark on a shared 24 GiB machine, no checkpoint inside a 20 s phase, and
# durable commits as in production so the comparison with pgbench is fair. Recorded.
PG_SETTINGS = {
    "max_connections": "300",
    "shared_buffers": "'1GB'",
    "effective_cache_size": "'4GB'",
    "work_mem": "'16MB'",
    "maintenance_work_mem": "'512MB'",
    "wal_buffers": "'16MB'",
    "max_wal_size": "'8GB'",
    "min_wal_size": "'1GB'",
    "checkpoint_timeout": "'30min'",
    "checkpoint_completion_target": "0.9",
    "random_page_cost": "1.1",
    # JIT compiles the occasional large audit query for longer than it runs.
    "jit": "off",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    # Where PostgreSQL's time goes, per phase (a few % of overhead, for pgbench too).
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "top",
    "log_checkpoints": "on",
}


def environment(config: Config, database_url: str, redis_url: str, port: int, folder: Path) -> dict:
    """The caller's environment and knobs, with the bench's servers, in production mode."""
    (folder / "metrics").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "REMIT_ENV": "production",
        "SECRET_KEY": secrets.token_hex(32),
        "SUPERUSER_PASSWORD": secrets.token_urlsafe(24),
        "WEB_CONCURRENCY": str(config.web_workers),
        "WORKER_CONCURRENCY": str(config.worker_processes),
        "PYTHONUNBUFFERED": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
    }
    # Hashing unbounded unless asked: phase g measures what cold logins cost, which the
    # bound would turn into 503s; phase j measures the bound itself (decision 0038).
    env.setdefault("HASH_CONCURRENCY", "100000")
    # Logging must stay as in production even when started from the test suite.
    env.pop("REMIT_LOG_SETUP", None)
    return env


def check(process: Process) -> None:
    if not process.alive():
        exited = f"{process.name} exited with status {process.returncode}"
        raise RuntimeError(f"{exited}, see {process.log_path}")


def migrate(env: dict, logs: Path) -> None:
    process = start("migrate", env, logs)
    if process.wait(300) != 0:
        process.kill()
        raise RuntimeError(f"python -m worker.cli migrate failed, see {process.log_path}")


def start(name: str, env: dict, logs: Path, **options: Any) -> Process:
    process = Process(name, services.command(name, **options), env, log=logs / f"{name}.log")
    process.start()
    return process


def wait_until(process: Process, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        check(process)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f} s")
        time.sleep(0.2)


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:  # URLError included
        return False


def node(queue: str = "celery") -> str:
    """The Celery node that consumes `queue`: the settlement worker, or the webhooks one."""
    return f"{'webhooks' if queue == 'webhooks' else 'celery'}@{socket.gethostname()}"


def worker_ready(process: Process, processes: int, queue: str = "celery") -> bool:
    """The worker answers a control ping and its whole pool has forked."""
    from worker.app import app

    answered = app.control.ping(timeout=0.5, destination=[node(queue)])
    return bool(answered) and len(process.tree()) >= processes


@contextlib.contextmanager
def paused(queue: str = "celery") -> Iterator[None]:
    """The worker of `queue` takes no message from it meanwhile (they wait in Redis)."""
    from worker.app import app

    def control(command: Callable[..., Any]) -> None:
        if not command(queue, reply=True, timeout=5, destination=[node(queue)]):
            raise RuntimeError(f"{node(queue)} did not acknowledge {command.__name__}")

    control(app.control.cancel_consumer)
    try:
        yield
    finally:
        control(app.control.add_consumer)
