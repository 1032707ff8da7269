"""Remit's own processes, started exactly as production starts them (ops.services):
migrate, gunicorn with web.gunicorn_conf, a Celery worker with its prefork pool. Only
the bind address differs: loopback, on a free port.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.config import ROOT, Config
from ops import services, supervisor


class StackError(RuntimeError):
    pass


def stack_environment(
    config: Config, database_url: str, redis_url: str, port: int, folder: Path
) -> dict:
    """The environment of every Remit process of the run (and of this process, which
    imports the project to load data, ring doorbells and audit).

    The caller's own knobs (SETTLE_BATCH_SIZE, DB_POOL_SIZE...) pass through, so a
    tuning experiment is one environment variable away; where the servers are, and
    that it runs as production does, is always the bench's.
    """
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "PORT": str(port),
            "REMIT_ENV": "production",
            "SECRET_KEY": secrets.token_hex(32),
            "SUPERUSER_PASSWORD": secrets.token_urlsafe(24),
            "WEB_CONCURRENCY": str(config.web_workers),
            "WORKER_CONCURRENCY": str(config.worker_processes),
            "PYTHONUNBUFFERED": "1",
            # gunicorn's workers share metrics through files: the run's own folder.
            "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
        }
    )
    (folder / "metrics").mkdir(parents=True, exist_ok=True)
    # Logging must stay as in production even when started from the test suite.
    env.pop("REMIT_LOG_SETUP", None)
    return env


class Process(supervisor.Process):
    """A server process in a session of its own, its output in a log file; started here."""

    def __init__(self, name: str, command: list[str], env: dict, log: Path) -> None:
        super().__init__(name, command, env, log=log)
        self.start()

    def check(self) -> None:
        if not self.alive():
            raise StackError(
                f"{self.name} exited with status {self.returncode}, see {self.log_path}"
            )


def migrate(env: dict, log: Path) -> None:
    with log.open("ab") as out:
        result = subprocess.run(
            services.command("migrate"), cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, check=False, timeout=300,
        )  # fmt: skip
    if result.returncode != 0:
        raise StackError(f"python -m worker.cli migrate failed, see {log}")


def start_web(env: dict, port: int, logs: Path) -> Process:
    return Process("web", services.command("web", bind=f"127.0.0.1:{port}"), env, logs / "web.log")


def start_worker(env: dict, logs: Path) -> Process:
    return Process("worker", services.command("worker"), env, logs / "worker.log")


def wait_for_http(process: Process, port: int, path: str = "/health", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}{path}"
    while True:
        process.check()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.2)


def wait_for_worker(process: Process, processes: int, timeout: float = 60) -> None:
    """Until the worker answers a control ping and its whole pool has forked."""
    from worker.app import app

    deadline = time.monotonic() + timeout
    while True:
        process.check()
        replies = app.control.ping(timeout=0.5)
        if replies and len(process.tree()) >= processes:
            return
        if time.monotonic() > deadline:
            raise StackError(f"the Celery worker did not answer a ping within {timeout:.0f} s")
        time.sleep(0.2)


def pause_consumers() -> None:
    """Stop the worker taking doorbells from the queue (they wait in Redis)."""
    from worker.app import app

    # One worker answers: limit=1 returns as soon as it has, instead of at the timeout.
    replies = app.control.cancel_consumer("celery", reply=True, timeout=5, limit=1)
    if not replies:
        raise StackError("the worker did not acknowledge cancel_consumer")


def resume_consumers() -> None:
    from worker.app import app

    replies = app.control.add_consumer("celery", reply=True, timeout=5, limit=1)
    if not replies:
        raise StackError("the worker did not acknowledge add_consumer")
