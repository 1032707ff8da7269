"""Typed settings from the environment, read once, in one place.

`Settings` is every knob of every process (web, worker, beat, migrate, tests), each
read from the environment variable named in its field. An entry point loads them once
(`load_settings`) and hands them on: `web.app.create_app(settings)`, and `use_settings`
for what `common/` builds lazily on first use (the engine, the Redis clients, the
password hasher). Nothing reads the environment at import. A value that is missing or
malformed stops the process at start with one clear line (`ConfigurationError`).
"""

from __future__ import annotations

import hmac
import os
import threading
from typing import Any, ClassVar

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from common.limits import PASSWORD_RULE, is_password_length

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/remit"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Transfers per settlement transaction (docs/decisions/0001-settlement-batch-size.md).
DEFAULT_SETTLE_BATCH_SIZE = 1000
# Only ever used when REMIT_ENV=development; production refuses to start without a real one.
DEVELOPMENT_SUPERUSER_PASSWORD = "remit-development-only"  # noqa: S105
# .env.example's placeholders start so: copied unedited, they are refused in production.
PLACEHOLDER_PREFIX = "change-me"
MIN_SECRET_KEY_LENGTH = 32
ENVIRONMENTS = ("development", "production", "test")
# docs/api.md: a webhook delivery succeeds with a 2xx within 10 s.
MAX_WEBHOOK_TIMEOUT_S = 10.0
# DATABASE_POOLER: what sits between the processes and PostgreSQL.
POOLERS = ("none", "pgbouncer")


class ConfigurationError(RuntimeError):
    """A setting is missing or malformed; the message is meant for the operator."""


def normalize_database_url(url: str) -> str:
    """Accept the plain libpq scheme too, and always drive it with psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _cores() -> int:
    return os.cpu_count() or 1


def _env(name: str, default: Any = None, **kwargs: Any) -> Any:
    """A field read from the environment variable `name`."""
    return Field(default, validation_alias=name, **kwargs)


class Settings(BaseSettings):
    """Every setting, each from the environment variable named in its field.

    Built from the environment by `load_settings()`, which also takes values by field
    name (`load_settings(redis_url=...)`), or from values alone by `settings_from()`.
    Only the variables are read: not field names (`port`) in the environment.
    """

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=True,
        env_ignore_empty=True,
        extra="ignore",
        validate_by_name=False,
        validate_by_alias=True,
        validate_default=True,
    )

    # Ordered as checked: the first complaint is the one an operator sees.
    environment: str = _env("REMIT_ENV", "development")
    superuser_password: str | None = _env("SUPERUSER_PASSWORD", repr=False)
    # Per-process random key when unset (outside production): only the in-memory auth
    # cache, the live-cache announcements and cursors depend on it.
    secret_key: bytes = _env("SECRET_KEY", b"", repr=False)
    database_url: str = _env("DATABASE_URL", DEFAULT_DATABASE_URL)
    redis_url: str = _env("REDIS_URL", DEFAULT_REDIS_URL)
    port: int = _env("PORT", 8000)
    flower_port: int = _env("FLOWER_PORT", 5555)
    web_concurrency: int = Field(default_factory=_cores, validation_alias="WEB_CONCURRENCY")
    # Threads per gunicorn worker process (gthread): requests one process serves at once.
    web_threads: int = _env("WEB_THREADS", 16)
    worker_concurrency: int = Field(default_factory=_cores, validation_alias="WORKER_CONCURRENCY")
    # Settlement tuning.
    settle_batch_size: int = _env("SETTLE_BATCH_SIZE", DEFAULT_SETTLE_BATCH_SIZE)
    # After a batch of fewer than settle_batch_size / 20 transfers, wait this long
    # before claiming again, to gather the next one.
    settle_gather_s: float = _env("SETTLE_GATHER", 0.015)
    settle_max_retries: int = _env("SETTLE_MAX_RETRIES", 8)
    # A transfer whose settlement attempts fail this many times becomes `failed`;
    # beat reopens failed transfers every failed_retry_interval_s until
    # failed_retry_window_s after their creation.
    settle_max_attempts: int = _env("SETTLE_MAX_ATTEMPTS", 5)
    failed_retry_interval_s: float = _env("FAILED_RETRY_INTERVAL", 300.0)
    failed_retry_window_s: float = _env("FAILED_RETRY_WINDOW", 86400.0)
    # A pending transfer older than this is presumed to have lost its doorbell.
    sweep_pending_after_s: float = _env("SWEEP_PENDING_AFTER", 5.0)
    sweep_interval_s: float = _env("SWEEP_INTERVAL", 5.0)
    # Celery: redelivery of unacknowledged messages after a crashed worker.
    visibility_timeout_s: int = _env("VISIBILITY_TIMEOUT", 300)
    auth_cache_ttl_s: float = _env("AUTH_CACHE_TTL", 3600.0)
    login_cache_ttl_s: float = _env("LOGIN_CACHE_TTL", 10.0)

    # Database pool (common.db). gunicorn sizes it to its threads (web.gunicorn_conf).
    db_pool_size: int = _env("DB_POOL_SIZE", 10)
    db_max_overflow: int = _env("DB_MAX_OVERFLOW", 20)
    # application_name in pg_stat_activity: tells the processes apart.
    db_application_name: str = _env("REMIT_APP_NAME", "remit")
    # PostgreSQL ends a session idle inside its transaction this long (a frozen process
    # would otherwise hold its locks, a currency's settlement lock included).
    db_idle_in_transaction_timeout_s: float = _env("DB_IDLE_IN_TRANSACTION_TIMEOUT", 30.0)
    # What DATABASE_URL points at: "none" (PostgreSQL itself) or "pgbouncer" (transaction
    # pooling: no server-side prepared statements, no startup options; docs/decisions/0039).
    database_pooler: str = _env("DATABASE_POOLER", "none")

    # argon2id cost (docs/decisions/0006-argon2-cost.md). Tests lower it.
    argon2_time_cost: int = _env("ARGON2_TIME_COST", 1)
    argon2_memory_kib: int = _env("ARGON2_MEMORY_KIB", 47104)

    # Logging: REMIT_LOG_SETUP=0 leaves logging alone (the test suite keeps pytest's).
    log_setup: bool = _env("REMIT_LOG_SETUP", True)
    log_level: str = _env("LOG_LEVEL", "INFO")

    # Login throttle (web.throttle): failures per username and per address in a window.
    login_throttle_window_s: int = _env("LOGIN_THROTTLE_WINDOW", 300)
    login_failures_per_username: int = _env("LOGIN_FAILURES_PER_USERNAME", 10)
    login_failures_per_address: int = _env("LOGIN_FAILURES_PER_ADDRESS", 100)

    # Webhook deliveries (common.webhooks, worker.webhooks; docs/decisions/0033). An
    # attempt gets webhook_timeout_s in all (name lookup, connect, request, status line).
    # The n-th retry waits about webhook_retry_base_s * 2^(n-1), at most webhook_retry_cap_s.
    webhook_timeout_s: float = _env("WEBHOOK_TIMEOUT", 10.0)
    webhook_retry_base_s: float = _env("WEBHOOK_RETRY_BASE", 5.0)
    webhook_retry_cap_s: float = _env("WEBHOOK_RETRY_CAP", 3600.0)
    # A delivery handed to the broker or taken by a worker is theirs this long; after it
    # (a lost message, a killed worker) the sweep hands it out again. Longer than an attempt.
    webhook_lease_s: float = _env("WEBHOOK_LEASE", 60.0)
    # Beat's sweep of due deliveries (retries and lost messages) runs this often.
    webhook_sweep_interval_s: float = _env("WEBHOOK_SWEEP_INTERVAL", 5.0)
    # Threads of the delivery worker (./run.sh webhooks): attempts in flight at once.
    webhook_concurrency: int = _env("WEBHOOK_CONCURRENCY", 16)

    # Overload (docs/decisions/0038): a currency whose settlement lags this far behind
    # takes no new work; registrations per client address per window; argon2 hashes at
    # once per process (0: the process's share of the cores, at most a quarter of
    # WEB_THREADS, at least 1).
    max_pending_age_s: float = _env("MAX_PENDING_AGE", 60.0)
    max_pending: int = _env("MAX_PENDING", 1_000_000)
    registrations_per_address: int = _env("REGISTRATIONS_PER_ADDRESS", 20)
    registration_window_s: int = _env("REGISTRATION_WINDOW", 600)
    hash_concurrency: int = _env("HASH_CONCURRENCY", 0)
    # Seconds a connection whose registration was refused for load is not read again
    # (web.gunicorn_worker), at most the Retry-After it was given; 0: not paused.
    refused_connection_pause_s: float = _env("REFUSED_CONNECTION_PAUSE", 1.0)

    # Where gunicorn's workers share their Prometheus metrics (web.gunicorn_conf).
    prometheus_multiproc_dir: str | None = _env("PROMETHEUS_MULTIPROC_DIR")

    # Integer settings that may be 0 (the rest must be at least 1).
    _MAY_BE_ZERO: ClassVar[frozenset[str]] = frozenset({"db_max_overflow", "hash_concurrency"})

    @property
    def hash_bound(self) -> int:
        """Password hashes (and verifications) one process runs at once. A hash is pure
        CPU: more at once than the process's share of the cores adds no throughput, only
        waiting for every request of the host (docs/decisions/0038). At most a quarter
        of the threads: in a container the core count is the node's, not the limit's."""
        share = min(_cores() // self.web_concurrency, self.web_threads // 4)
        return self.hash_concurrency or max(1, share)

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

    # --- parsing: the same rules and messages as the environment always had ---------------

    @classmethod
    def _name(cls, info: ValidationInfo) -> str:
        """The environment variable behind a field, for messages."""
        assert info.field_name is not None
        alias = cls.model_fields[info.field_name].validation_alias
        return alias if isinstance(alias, str) else info.field_name.upper()

    @classmethod
    def _default(cls, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return cls.model_fields[info.field_name].get_default(call_default_factory=True)

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, value: Any) -> str:
        environment = str(value).strip() or "development"
        if environment not in ENVIRONMENTS:
            raise ValueError(
                f"REMIT_ENV must be development, production or test, got {environment!r}"
            )
        return environment

    @field_validator("superuser_password", mode="before")
    @classmethod
    def _password(cls, value: Any) -> str | None:
        return value or None

    @field_validator("secret_key", mode="before")
    @classmethod
    def _secret(cls, value: Any, info: ValidationInfo) -> bytes:
        secret = value.decode() if isinstance(value, bytes) else str(value or "")
        if info.data.get("environment") == "production":
            # Checked by every process (web, worker, beat, flower, migrate, cli), so that
            # the stack as a whole refuses to start, not just the step that uses it.
            _require_production_secrets(info.data.get("superuser_password"), secret)
        if not secret:
            secret = os.urandom(32).hex()
        return secret.encode()

    @field_validator("database_url", "redis_url", "db_application_name", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> str:
        text = str(value).strip() or cls._default(info)
        return normalize_database_url(text) if info.field_name == "database_url" else text

    @field_validator(
        "port",
        "flower_port",
        "web_concurrency",
        "web_threads",
        "worker_concurrency",
        "settle_batch_size",
        "settle_max_retries",
        "settle_max_attempts",
        "visibility_timeout_s",
        "db_pool_size",
        "db_max_overflow",
        "argon2_time_cost",
        "argon2_memory_kib",
        "login_throttle_window_s",
        "login_failures_per_username",
        "login_failures_per_address",
        "webhook_concurrency",
        "max_pending",
        "registrations_per_address",
        "registration_window_s",
        "hash_concurrency",
        mode="before",
    )
    @classmethod
    def _count(cls, value: Any, info: ValidationInfo) -> int:
        if isinstance(value, int):
            number = value
        else:
            raw = str(value).strip()
            if not raw:
                return int(cls._default(info))
            try:
                number = int(raw)
            except ValueError:
                raise ValueError(f"{cls._name(info)} must be an integer, got {raw!r}") from None
        least = 0 if info.field_name in cls._MAY_BE_ZERO else 1
        if number < least:
            raise ValueError(f"{cls._name(info)} must be at least {least}, got {number}")
        return number

    @field_validator(
        "settle_gather_s",
        "failed_retry_interval_s",
        "failed_retry_window_s",
        "sweep_pending_after_s",
        "sweep_interval_s",
        "auth_cache_ttl_s",
        "login_cache_ttl_s",
        "db_idle_in_transaction_timeout_s",
        "webhook_timeout_s",
        "webhook_retry_base_s",
        "webhook_retry_cap_s",
        "webhook_lease_s",
        "webhook_sweep_interval_s",
        "max_pending_age_s",
        "refused_connection_pause_s",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: Any, info: ValidationInfo) -> float:
        raw = str(value).strip()
        if not raw:
            return float(cls._default(info))
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(
                f"{cls._name(info)} must be a number of seconds, got {raw!r}"
            ) from None
        if not seconds >= 0:  # also refuses nan
            raise ValueError(f"{cls._name(info)} must be 0 or more seconds, got {raw!r}")
        return seconds

    @field_validator(
        "webhook_timeout_s",
        "webhook_retry_base_s",
        "webhook_retry_cap_s",
        "webhook_lease_s",
        "webhook_sweep_interval_s",
    )
    @classmethod
    def _webhook_seconds(cls, value: float, info: ValidationInfo) -> float:
        # docs/api.md: success is a 2xx within 10 s, and a lease must outlast an attempt.
        name = cls._name(info)
        if not 0 < value < float("inf"):
            raise ValueError(f"{name} must be more than 0 seconds, got {value}")
        if info.field_name == "webhook_timeout_s" and value > MAX_WEBHOOK_TIMEOUT_S:
            raise ValueError(f"{name} must be at most {MAX_WEBHOOK_TIMEOUT_S:g} seconds")
        timeout = info.data.get("webhook_timeout_s")
        if info.field_name == "webhook_lease_s" and timeout is not None and value <= timeout:
            raise ValueError(f"{name} must be longer than WEBHOOK_TIMEOUT ({timeout:g} s)")
        return value

    @field_validator("database_pooler", mode="before")
    @classmethod
    def _pooler(cls, value: Any) -> str:
        pooler = str(value).strip().lower() or "none"
        if pooler not in POOLERS:
            raise ValueError(f"DATABASE_POOLER must be none or pgbouncer, got {pooler!r}")
        return pooler

    @field_validator("log_setup", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> bool:
        return value if isinstance(value, bool) else str(value).strip() != "0"

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> str:
        return str(value).strip().upper() or "INFO"

    @field_validator("prometheus_multiproc_dir", mode="before")
    @classmethod
    def _folder(cls, value: Any) -> str | None:
        return str(value).strip() or None if value is not None else None


class _GivenSettings(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _by_variable(values: dict[str, Any]) -> dict[str, Any]:
    """Values by field name, keyed by their variables: how Settings takes them."""
    unknown = set(values) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"no such settings: {sorted(unknown)}")
    return {str(Settings.model_fields[name].validation_alias): v for name, v in values.items()}


def settings_from(**values: Any) -> Settings:
    """Settings from `values` (by field name) and the defaults, not the environment."""
    try:
        return _GivenSettings(**_by_variable(values))
    except ValidationError as error:
        raise _one_line(error) from None


def _require_production_secrets(superuser_password: str | None, secret: str) -> None:
    """Production never runs on a missing, default or placeholder secret."""
    if not superuser_password:
        raise ValueError("SUPERUSER_PASSWORD is required when REMIT_ENV=production")
    is_default = hmac.compare_digest(
        superuser_password.encode("utf-8", "surrogatepass"), DEVELOPMENT_SUPERUSER_PASSWORD.encode()
    )
    if is_default or superuser_password.startswith(PLACEHOLDER_PREFIX):
        raise ValueError(
            "SUPERUSER_PASSWORD is the development default or .env.example's placeholder: "
            "set a real password when REMIT_ENV=production"
        )
    if not is_password_length(superuser_password):
        raise ValueError(f"SUPERUSER_PASSWORD must have {PASSWORD_RULE}")
    if not secret:
        raise ValueError("SECRET_KEY is required when REMIT_ENV=production")
    if secret.startswith(PLACEHOLDER_PREFIX) or len(secret) < MIN_SECRET_KEY_LENGTH:
        raise ValueError(
            f"SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} random characters, not "
            ".env.example's placeholder (python3 -c 'import secrets; print(secrets.token_hex(32))')"
        )


def _one_line(error: ValidationError) -> ConfigurationError:
    """The first complaint, as the operator should read it (no pydantic report)."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, Exception):
        return ConfigurationError(str(cause))
    where = ".".join(str(part) for part in first["loc"])
    return ConfigurationError(f"{where}: {first['msg']}")


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment (and `overrides`, by field name)."""
    try:
        return Settings(**_by_variable(overrides))
    except ValidationError as error:
        raise _one_line(error) from None


_current: Settings | None = None
_current_lock = threading.Lock()


def use_settings(settings: Settings) -> Settings:
    """Make `settings` the process's: what get_settings() returns from now on.

    Called by an entry point (web.wsgi, web.gunicorn_conf, the test suite) before
    anything is built from them; the engine and clients built earlier are not rebuilt.
    """
    global _current  # noqa: PLW0603 - the one process-wide settings, set by the entry point
    with _current_lock:
        _current = settings
    return settings


def get_settings() -> Settings:
    """The process's settings: those an entry point set, else loaded from the
    environment on first use (worker, beat and scripts)."""
    global _current  # noqa: PLW0603 - loaded once, on first use, never at import
    current = _current
    if current is None:
        with _current_lock:
            if _current is None:
                _current = load_settings()
            current = _current
    return current
