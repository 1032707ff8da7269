"""Settings: read from the environment by their documented names, checked with one clear
line for the operator, and production refuses missing or placeholder secrets. Also: what
is built from settings is built from the settings given, and importing the modules of
common/ and web/ reads no environment and reaches no server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import extract_parameters

from common.db import make_engine
from common.passwords import make_hasher
from common.settings import (
    DEFAULT_DATABASE_URL,
    DEVELOPMENT_SUPERUSER_PASSWORD,
    ConfigurationError,
    Settings,
    load_settings,
    settings_from,
)
from tests.unit.conftest import NOWHERE_DATABASE_URL
from web.context import settings_of

ROOT = Path(__file__).resolve().parents[2]
GOOD_KEY = "k" * 64


# --- production refuses to start without real secrets -------------------------------------


@pytest.mark.parametrize(
    ("password", "key", "complaint"),
    [
        (None, GOOD_KEY, "SUPERUSER_PASSWORD is required"),
        ("a-real-password", None, "SECRET_KEY is required"),
        (DEVELOPMENT_SUPERUSER_PASSWORD, GOOD_KEY, "development default"),
        ("change-me-to-a-long-random-password", GOOD_KEY, "placeholder"),
        ("short", GOOD_KEY, "8 to 1024 characters"),
        ("a-real-password", "change-me-to-64-random-hex-characters", "SECRET_KEY must be"),
        ("a-real-password", "too-short-a-key", "SECRET_KEY must be"),
    ],
)
def test_production_refuses_missing_or_default_secrets(
    monkeypatch, password: str | None, key: str | None, complaint: str
) -> None:
    monkeypatch.setenv("REMIT_ENV", "production")
    for name, value in (("SUPERUSER_PASSWORD", password), ("SECRET_KEY", key)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=complaint):
        load_settings()


def test_production_starts_with_real_secrets(monkeypatch) -> None:
    monkeypatch.setenv("REMIT_ENV", "production")
    monkeypatch.setenv("SUPERUSER_PASSWORD", "a-real-password")
    monkeypatch.setenv("SECRET_KEY", GOOD_KEY)
    assert load_settings().require_superuser_password() == "a-real-password"


@pytest.mark.parametrize("environment", ["test", "production"])
def test_only_development_has_a_default_superuser_password(monkeypatch, environment) -> None:
    monkeypatch.setenv("REMIT_ENV", "development")
    monkeypatch.delenv("SUPERUSER_PASSWORD", raising=False)
    assert load_settings().require_superuser_password() == DEVELOPMENT_SUPERUSER_PASSWORD
    monkeypatch.setenv("REMIT_ENV", environment)
    monkeypatch.setenv("SECRET_KEY", GOOD_KEY)
    with pytest.raises(ConfigurationError, match="SUPERUSER_PASSWORD is required"):
        load_settings().require_superuser_password()


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_seconds_settings_refuse_what_is_not_a_duration(monkeypatch, value: str) -> None:
    monkeypatch.setenv("SETTLE_GATHER", value)
    with pytest.raises(ConfigurationError, match="SETTLE_GATHER must be"):
        load_settings()


# --- every knob by its environment name ---------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("DB_POOL_SIZE", "7", "db_pool_size", 7),
        ("DB_MAX_OVERFLOW", "0", "db_max_overflow", 0),
        ("REMIT_APP_NAME", "remit-worker", "db_application_name", "remit-worker"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "2.5", "db_idle_in_transaction_timeout_s", 2.5),
        ("ARGON2_TIME_COST", "2", "argon2_time_cost", 2),
        ("ARGON2_MEMORY_KIB", "2048", "argon2_memory_kib", 2048),
        ("REMIT_LOG_SETUP", "0", "log_setup", False),
        ("REMIT_LOG_SETUP", "1", "log_setup", True),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("LOGIN_THROTTLE_WINDOW", "60", "login_throttle_window_s", 60),
        ("LOGIN_FAILURES_PER_USERNAME", "3", "login_failures_per_username", 3),
        ("LOGIN_FAILURES_PER_ADDRESS", "30", "login_failures_per_address", 30),
        ("MAX_PENDING_AGE", "30", "max_pending_age_s", 30.0),
        ("MAX_PENDING", "5000", "max_pending", 5000),
        ("REGISTRATIONS_PER_ADDRESS", "5", "registrations_per_address", 5),
        ("REGISTRATION_WINDOW", "60", "registration_window_s", 60),
        ("HASH_CONCURRENCY", "0", "hash_concurrency", 0),
        ("HASH_CONCURRENCY", "3", "hash_concurrency", 3),
        ("REFUSED_CONNECTION_PAUSE", "0", "refused_connection_pause_s", 0.0),
        ("REFUSED_CONNECTION_PAUSE", "0.25", "refused_connection_pause_s", 0.25),
        ("PROMETHEUS_MULTIPROC_DIR", "/run/m", "prometheus_multiproc_dir", "/run/m"),
        ("SETTLE_BATCH_SIZE", " 50 ", "settle_batch_size", 50),
        ("SWEEP_INTERVAL", "0", "sweep_interval_s", 0.0),
        ("DATABASE_URL", "postgres://u@h/db", "database_url", "postgresql+psycopg://u@h/db"),
        ("DATABASE_URL", "postgresql://u@h/db", "database_url", "postgresql+psycopg://u@h/db"),
        ("DATABASE_URL", "  ", "database_url", DEFAULT_DATABASE_URL),
        ("PORT", "", "port", 8000),
    ],
)
def test_each_setting_is_read_from_its_variable(
    monkeypatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == expected


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("PORT", "eighty", "PORT must be an integer, got 'eighty'"),
        ("WEB_THREADS", "0", "WEB_THREADS must be at least 1, got 0"),
        ("DB_POOL_SIZE", "many", "DB_POOL_SIZE must be an integer, got 'many'"),
        ("DB_MAX_OVERFLOW", "-1", "DB_MAX_OVERFLOW must be at least 0, got -1"),
        ("ARGON2_TIME_COST", "0", "ARGON2_TIME_COST must be at least 1, got 0"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "x", "DB_IDLE_IN_TRANSACTION_TIMEOUT must be a number"),
        ("REMIT_ENV", "staging", "REMIT_ENV must be development, production or test"),
    ],
)
def test_a_malformed_setting_is_one_line_naming_its_variable(
    monkeypatch, variable: str, value: str, complaint: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert str(raised.value).startswith(complaint)
    assert "\n" not in str(raised.value)


def test_only_the_documented_variables_are_read(monkeypatch) -> None:
    # Not the fields' own names: a stray `port` or `environment` in a shell changes nothing.
    monkeypatch.setenv("port", "1234")
    monkeypatch.setenv("environment", "production")
    monkeypatch.setenv("REMIT_ENV", "development")
    monkeypatch.delenv("PORT", raising=False)
    settings = load_settings()
    assert (settings.port, settings.environment) == (8000, "development")


def test_values_are_given_by_field_name() -> None:
    assert load_settings(port=9000).port == 9000
    with pytest.raises(TypeError, match="no such settings"):
        settings_from(PORT=9000)


def test_without_a_secret_key_each_process_makes_its_own(monkeypatch) -> None:
    monkeypatch.setenv("REMIT_ENV", "development")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    first, second = load_settings().secret_key, load_settings().secret_key
    assert len(first) == 64
    assert first != second


def test_secrets_are_not_in_the_settings_repr() -> None:
    settings = settings_from(superuser_password="hidden-password", secret_key=GOOD_KEY.encode())
    assert "hidden-password" not in repr(settings)
    assert GOOD_KEY not in repr(settings)


def test_settings_from_values_ignore_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("PORT", "not a port")
    monkeypatch.setenv("SETTLE_BATCH_SIZE", "7")
    settings = settings_from(port=9000)
    assert isinstance(settings, Settings)
    assert (settings.port, settings.settle_batch_size) == (9000, 1000)


def test_the_settings_check_is_one_line_and_status_2() -> None:
    # ./run.sh makes the same check before it starts a service.
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "check-config"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "REMIT_ENV": "production"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == "remit: SUPERUSER_PASSWORD is required when REMIT_ENV=production\n"


# --- what is built from settings, and what importing does ---------------------------------


def test_the_engine_is_built_from_the_settings_given_without_connecting() -> None:
    engine = make_engine(settings_from(database_url=NOWHERE_DATABASE_URL, db_pool_size=7))
    try:
        assert engine.pool.size() == 7  # type: ignore[attr-defined]
        assert engine.url.port == 1
    finally:
        engine.dispose()


def test_the_hasher_is_built_from_the_settings_given() -> None:
    hasher = make_hasher(settings_from(argon2_time_cost=2, argon2_memory_kib=2048))
    parameters = extract_parameters(hasher.hash("a password"))
    assert (parameters.time_cost, parameters.memory_cost) == (2, 2048)


def test_importing_common_and_web_reads_no_setting() -> None:
    # Malformed settings everywhere and no server anywhere: an import that read the
    # environment or connected would fail here.
    script = (
        "import common.db, common.logs, common.migrate, common.passwords,"
        " common.redis_clients, common.users, web.auth, web.context, web.health, web.throttle"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "REMIT_ENV": "nonsense",
            "DATABASE_URL": NOWHERE_DATABASE_URL,
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "ARGON2_MEMORY_KIB": "lots",
            "DB_POOL_SIZE": "many",
            "LOGIN_THROTTLE_WINDOW": "forever",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_an_app_is_built_from_the_settings_it_is_given(app, settings: Settings) -> None:
    assert settings_of(app) is settings
    # The API's description needs no service.
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.get_json()["openapi"].startswith("3.")
