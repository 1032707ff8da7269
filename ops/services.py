"""Each service's command line and environment, defined once: `./run.sh <service>` (what
every docker compose service runs), `./run.sh up`, the benchmark and the chaos suite
all start them from here."""

from __future__ import annotations

import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

from ops import RUN, die

SERVICES = ("migrate", "web", "worker", "webhooks", "beat", "flower")


def command(
    name: str,
    *,
    bind: str | None = None,
    hostname: str | None = None,
    schedule: Path | None = None,
    address: str | None = None,
) -> list[str]:
    """The command line of one service. `bind` overrides gunicorn's 0.0.0.0:$PORT (a
    loopback port for the bench and chaos runs); `hostname` names a Celery worker node;
    `address` is Flower's listening address (its default: every interface)."""
    python = sys.executable
    celery = [python, "-m", "celery", "--app", "worker.app"]
    if name == "migrate":
        return [python, "-m", "worker.cli", "migrate"]
    if name == "web":
        binding = ["--bind", bind] if bind else []
        return [python, "-m", "gunicorn", "--config", "python:web.gunicorn_conf", *binding,
                "web.wsgi:app"]  # fmt: skip
    if name == "worker":
        node = ["--hostname", hostname] if hostname else []
        return [*celery, "worker", "--loglevel", "INFO", *node]
    if name == "webhooks":
        # Webhook deliveries only, on WEBHOOK_CONCURRENCY threads: an attempt mostly
        # waits on its receiver (docs/decisions/0033).
        from common.settings import load_settings

        threads = str(load_settings().webhook_concurrency)
        node = ["--hostname", hostname or "webhooks@%h"]
        return [*celery, "worker", "--loglevel", "INFO", "--queues", "webhooks",
                "--pool", "threads", "--concurrency", threads, *node]  # fmt: skip
    if name == "beat":
        return [
            *celery,
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(schedule or beat_schedule()),
        ]
    if name == "flower":
        port = os.environ.get("FLOWER_PORT", "5555")
        listen = [f"--address={address}"] if address else []
        return [*celery, "flower", f"--port={port}", *listen]
    raise ValueError(f"no service {name!r}")


def worker_ping() -> list[str]:
    return [sys.executable, "-m", "celery", "--app", "worker.app", "inspect", "ping",
            "--timeout", "1"]  # fmt: skip


def beat_schedule() -> Path:
    """Beat keeps its last run times in .run; where the checkout is read-only to the user
    (the Docker image's /app), in the temporary folder instead."""
    try:
        RUN.mkdir(parents=True, exist_ok=True)
        if os.access(RUN, os.W_OK):
            return RUN / "celerybeat-schedule"
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "remit-celerybeat-schedule"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 2


def set_defaults() -> tuple[bool, bool]:
    """The configuration defaults of README.md, in this process's environment (inherited
    by every process it starts). Returns whether DATABASE_URL and REDIS_URL are ours: only
    a URL chosen here may be served by a throwaway server; the user's is used as it is."""
    env = os.environ
    pg_port = env.setdefault("REMIT_PG_PORT", "5432")
    redis_port = env.setdefault("REMIT_REDIS_PORT", "6379")
    database_default = not env.get("DATABASE_URL")
    if database_default:
        env["DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/remit"
    redis_default = not env.get("REDIS_URL")
    if redis_default:
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    cores = str(_cores())
    for name, value in (
        ("REMIT_ENV", "development"),
        ("PORT", "8000"),
        ("FLOWER_PORT", "5555"),
        ("WEB_CONCURRENCY", cores),
        ("WORKER_CONCURRENCY", cores),
    ):
        if not env.get(name):
            env[name] = value
    return database_default, redis_default


def check_settings() -> None:
    """Refuses, with the one line that says why, a configuration the processes would refuse
    at start (REMIT_ENV=production without SUPERUSER_PASSWORD...): their own check, before
    anything starts."""
    from common.settings import ConfigurationError, load_settings

    try:
        load_settings()
    except ConfigurationError as error:
        die(str(error), 2)


def flower_auth() -> bool:
    """Flower is always behind a password: FLOWER_BASIC_AUTH ("user:password", read by
    Flower from the environment, so it stays out of `ps`), else FLOWER_USER and
    FLOWER_PASSWORD; in development with none set, a random password for this run.
    Returns True when it made one up (to print it once)."""
    env = os.environ
    user, password = env.get("FLOWER_USER", ""), env.get("FLOWER_PASSWORD", "")
    if not env.get("FLOWER_BASIC_AUTH") and (user or password):
        if not (user and password):
            die("set both FLOWER_USER and FLOWER_PASSWORD (or FLOWER_BASIC_AUTH=user:password)")
        env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    generated = False
    if not env.get("FLOWER_BASIC_AUTH"):
        if env["REMIT_ENV"] != "development":
            die(
                f"Flower needs a password when REMIT_ENV={env['REMIT_ENV']}: set "
                "FLOWER_BASIC_AUTH=user:password (or FLOWER_USER and FLOWER_PASSWORD)"
            )
        env["FLOWER_BASIC_AUTH"] = f"operator:{secrets.token_urlsafe(18)}"
        generated = True
    auth = env["FLOWER_BASIC_AUTH"]
    if not re.fullmatch(r"[^:,]+:[^,]+", auth):
        die("FLOWER_BASIC_AUTH must be user:password (with no comma), e.g. operator:a-long-secret")
    if env["REMIT_ENV"] == "production" and ":change-me" in auth:
        die(
            "the Flower password is .env.example's placeholder: set a real one when "
            "REMIT_ENV=production"
        )
    return generated
