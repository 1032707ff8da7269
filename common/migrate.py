"""The migrate step: create the database if needed, upgrade the schema, apply the seed.

Idempotent: run it on every deploy: `python -m common.migrate` (the CLI's `migrate`).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from common.models import SUPERUSER_ID
from common.passwords import hash_password, needs_rehash, verify_password
from common.settings import (
    Settings,
    get_settings,
    normalize_database_url,
)
from common.users import announce_credentials_changed

ROOT = Path(__file__).resolve().parent.parent


def ensure_database(database_url: str) -> None:
    """Create the target database when the server has none of that name."""
    url = make_url(normalize_database_url(database_url))
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
            )
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{url.database}"'))
    finally:
        admin.dispose()


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def set_superuser_password(database_url: str, password: str) -> None:
    engine = create_engine(normalize_database_url(database_url))
    try:
        with engine.begin() as connection:
            current = connection.scalar(
                text("SELECT password_hash FROM users WHERE id = :id"), {"id": SUPERUSER_ID}
            )
            # Re-hashing on every deploy would be harmless but slow; keep a matching hash
            # (unless it was made with another cost than today's).
            if (
                current
                and verify_password(SUPERUSER_ID, password, current)
                and not needs_rehash(current)
            ):
                return
            connection.execute(
                text("UPDATE users SET password_hash = :hash WHERE id = :id"),
                {"hash": hash_password(password), "id": SUPERUSER_ID},
            )
    finally:
        engine.dispose()
    # Committed: running web processes forget the logins they remember.
    announce_credentials_changed()


def migrate(database_url: str | None = None, settings: Settings | None = None) -> None:
    """Create the database if need be, apply the migrations, set the superuser's password.

    `settings`: the process's (get_settings()) unless given.
    """
    settings = settings or get_settings()
    url = database_url or settings.database_url
    password = settings.require_superuser_password()
    ensure_database(url)
    command.upgrade(alembic_config(url), "head")
    set_superuser_password(url, password)
