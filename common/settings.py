"""Typed settings from the environment, read once, in one place.

Every entry point (web, worker, beat, migrate, tests) reads the same knobs;
a required value that is missing stops the process at start with one clear line.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from functools import cache

from common.limits import PASSWORD_RULE, is_password_length

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/remit"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Transfers per settlement transaction: 1000 settled a backlog fastest on 2 cores
# (bench/README.md, "Reproducing and tuning").
DEFAULT_SETTLE_BATCH_SIZE = 1000
# Only ever used when REMIT_ENV=development; production refuses to start without a real one.
DEVELOPMENT_SUPERUSER_PASSWORD = "remit-development-only"  # noqa: S105
# .env.example's placeholders start so: copied unedited, they are refused in production.
PLACEHOLDER_PREFIX = "change-me"
MIN_SECRET_KEY_LENGTH = 32


class ConfigurationError(RuntimeError):
    """A setting is missing or malformed; the message is meant for the operator."""


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ConfigurationError(f"{name} must be at least 1, got {value}")
    return value


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not seconds >= 0:  # also refuses nan
        raise ConfigurationError(f"{name} must be 0 or more seconds, got {raw!r}")
    return seconds


def normalize_database_url(url: str) -> str:
    """Accept the plain libpq scheme too, and always drive it with psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class Settings:
    environment: str
    database_url: str
    redis_url: str
    superuser_password: str | None
    secret_key: bytes
    port: int
    flower_port: int
    web_concurrency: int
    # Threads per gunicorn worker process (gthread): requests one process serves at once.
    web_threads: int
    worker_concurrency: int
    # Settlement tuning.
    settle_batch_size: int
    # After a batch of fewer than settle_batch_size / 20 transfers, wait this long
    # before claiming again, to gather the next one.
    settle_gather_s: float
    settle_max_retries: int
    # A transfer whose settlement attempts fail this many times becomes `failed`;
    # beat reopens failed transfers every failed_retry_interval_s until
    # failed_retry_window_s after their creation.
    settle_max_attempts: int
    failed_retry_interval_s: float
    failed_retry_window_s: float
    # A pending transfer older than this is presumed to have lost its doorbell.
    sweep_pending_after_s: float
    sweep_interval_s: float
    # Celery: redelivery of unacknowledged messages after a crashed worker.
    visibility_timeout_s: int
    auth_cache_ttl_s: float
    login_cache_ttl_s: float

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    def require_superuser_password(self) -> str:
        if self.superuser_password:
            return self.superuser_password
        if self.environment != "development":
            raise ConfigurationError(
                f"SUPERUSER_PASSWORD is required when REMIT_ENV={self.environment}"
            )
        return DEVELOPMENT_SUPERUSER_PASSWORD


def _require_production_secrets(superuser_password: str | None, secret: str) -> None:
    """Production never runs on a missing, default or placeholder secret."""
    if not superuser_password:
        raise ConfigurationError("SUPERUSER_PASSWORD is required when REMIT_ENV=production")
    is_default = hmac.compare_digest(
        superuser_password.encode("utf-8", "surrogatepass"), DEVELOPMENT_SUPERUSER_PASSWORD.encode()
    )
    if is_default or superuser_password.startswith(PLACEHOLDER_PREFIX):
        raise ConfigurationError(
            "SUPERUSER_PASSWORD is the development default or .env.example's placeholder: "
            "set a real password when REMIT_ENV=production"
        )
    if not is_password_length(superuser_password):
        raise ConfigurationError(f"SUPERUSER_PASSWORD must have {PASSWORD_RULE}")
    if not secret:
        raise ConfigurationError("SECRET_KEY is required when REMIT_ENV=production")
    if secret.startswith(PLACEHOLDER_PREFIX) or len(secret) < MIN_SECRET_KEY_LENGTH:
        raise ConfigurationError(
            f"SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} random characters, not "
            ".env.example's placeholder (python3 -c 'import secrets; print(secrets.token_hex(32))')"
        )


def load_settings() -> Settings:
    environment = os.environ.get("REMIT_ENV", "development").strip() or "development"
    if environment not in {"development", "production", "test"}:
        raise ConfigurationError(
            f"REMIT_ENV must be development, production or test, got {environment!r}"
        )
    secret = os.environ.get("SECRET_KEY", "")
    superuser_password = os.environ.get("SUPERUSER_PASSWORD") or None
    if environment == "production":
        # Checked by every process (web, worker, beat, flower, migrate, cli), so that the
        # stack as a whole refuses to start, not just the step that applies the password.
        _require_production_secrets(superuser_password, secret)
    if not secret:
        # Per-process random key: only the in-memory auth cache and cursors depend on it.
        secret = os.urandom(32).hex()
    cores = os.cpu_count() or 1
    return Settings(
        environment=environment,
        database_url=normalize_database_url(
            os.environ.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL
        ),
        redis_url=os.environ.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL,
        superuser_password=superuser_password,
        secret_key=secret.encode(),
        port=_int("PORT", 8000),
        flower_port=_int("FLOWER_PORT", 5555),
        web_concurrency=_int("WEB_CONCURRENCY", cores),
        web_threads=_int("WEB_THREADS", 16),
        worker_concurrency=_int("WORKER_CONCURRENCY", cores),
        settle_batch_size=_int("SETTLE_BATCH_SIZE", DEFAULT_SETTLE_BATCH_SIZE),
        settle_gather_s=_seconds("SETTLE_GATHER", 0.015),
        settle_max_retries=_int("SETTLE_MAX_RETRIES", 8),
        settle_max_attempts=_int("SETTLE_MAX_ATTEMPTS", 5),
        failed_retry_interval_s=_seconds("FAILED_RETRY_INTERVAL", 300.0),
        failed_retry_window_s=_seconds("FAILED_RETRY_WINDOW", 86400.0),
        sweep_pending_after_s=_seconds("SWEEP_PENDING_AFTER", 5.0),
        sweep_interval_s=_seconds("SWEEP_INTERVAL", 5.0),
        visibility_timeout_s=_int("VISIBILITY_TIMEOUT", 300),
        auth_cache_ttl_s=_seconds("AUTH_CACHE_TTL", 3600.0),
        login_cache_ttl_s=_seconds("LOGIN_CACHE_TTL", 10.0),
    )


@cache
def get_settings() -> Settings:
    return load_settings()


if __name__ == "__main__":
    # `python -m common.settings`: the CLI's check-config.
    from common import cli

    cli.check_config(prog_name="python -m common.settings")
