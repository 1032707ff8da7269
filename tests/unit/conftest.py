"""Unit tests: no PostgreSQL, no Redis, no worker; they run in seconds.

The suite's integration fixtures (tests/conftest.py) are replaced here by ones that
reach nothing: the run's database and Redis DB are never made for these tests, and an
app is built from settings that point at closed ports, so that a test which would need
a service fails at once instead of quietly using one.
"""

from __future__ import annotations

import pytest

from common.settings import Settings, settings_from

# Port 1 on the loopback: nothing listens there.
NOWHERE_DATABASE_URL = "postgresql+psycopg://nobody@127.0.0.1:1/none"
NOWHERE_REDIS_URL = "redis://127.0.0.1:1/0"


def unit_settings(**changes: object) -> Settings:
    """Settings for a unit test, from nothing in the environment."""
    values: dict[str, object] = {
        "environment": "test",
        "database_url": NOWHERE_DATABASE_URL,
        "redis_url": NOWHERE_REDIS_URL,
        "superuser_password": "unit-test-password",
        "secret_key": b"u" * 64,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        "log_setup": False,
    }
    values.update(changes)
    return settings_from(**values)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return unit_settings()


@pytest.fixture(scope="session")
def database() -> None:
    return None


@pytest.fixture
def _no_login_throttle_carry_over() -> None:
    return None


@pytest.fixture(scope="session")
def redis_client() -> None:
    pytest.fail("a unit test needs no Redis: move it out of tests/unit")


@pytest.fixture(scope="session")
def app(settings: Settings):
    from web.app import create_app  # noqa: PLC0415 - the app only where a test asks for it

    flask_app = create_app(settings)
    flask_app.testing = True
    return flask_app
