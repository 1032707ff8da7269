"""Migrations: the models agree with them, they go down and up, and the seed is docs/api.md's.

Scratch databases made here are created and dropped by the tests themselves; the
run's own database (the `database` fixture) is only read.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.engine import make_url

from common.migrate import alembic_config, migrate, set_superuser_password
from common.models import SUPERUSER_ID, Base
from common.settings import get_settings
from tests.conftest import SUPERUSER_PASSWORD, TEST_DATABASE

SEED_CURRENCIES = {
    "USD": ("United States Dollar", 2, Decimal("0.01")),
    "CNY": ("Chinese Yuan", 2, Decimal("0.02")),
    "EUR": ("Euro", 2, Decimal("0.03")),
}
TABLES = {
    *("currencies", "users", "accounts", "transfers", "postings"),
    *("api_keys", "events", "webhooks", "webhook_deliveries", "webhook_attempts"),
    "holds",
}


def _diff(connection: Connection, metadata: MetaData) -> list:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return compare_metadata(context, metadata)


def _admin_engine() -> Engine:
    """The server's maintenance database, for CREATE/DROP DATABASE."""
    url = make_url(get_settings().database_url).set(database="postgres")
    return create_engine(url, isolation_level="AUTOCOMMIT")


def _config(url: str) -> Config:
    config = alembic_config(url)
    # Keep pytest's logging: env.py would otherwise load alembic.ini's logging config.
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture
def scratch_url(database: str) -> Iterator[str]:
    """The URL of a database that does not exist yet; dropped after the test."""
    name = f"{TEST_DATABASE}_mig_{secrets.token_hex(3)}"
    url = make_url(database).set(database=name).render_as_string(hide_password=False)
    yield url
    admin = _admin_engine()
    try:
        with admin.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


def _create_empty(url: str) -> None:
    admin = _admin_engine()
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{make_url(url).database}"'))
    finally:
        admin.dispose()


@contextmanager
def _with_connection(url: str) -> Iterator[Connection]:
    """A connection whose engine is disposed with it: no pooled sockets left behind."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


# --- models and migrations agree ----------------------------------------------------------


def test_models_match_the_migrated_schema(database: str) -> None:
    """The CI guard: a model change without a migration (or the reverse) fails here."""
    with _with_connection(database) as connection:
        assert _diff(connection, Base.metadata) == []


def test_the_comparison_does_notice_a_disagreement(database: str) -> None:
    # The guard above is only worth something if a real drift makes it fail.
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["accounts"].append_column(Column("nickname", Integer, nullable=True))
    drifted.remove(drifted.tables["postings"])
    with _with_connection(database) as connection:
        diff = _diff(connection, drifted)
    kinds = {entry[0] if isinstance(entry, tuple) else entry[0][0] for entry in diff}
    assert "add_column" in kinds
    assert "remove_table" in kinds


def test_check_constraints_and_partial_indexes_match(database: str) -> None:
    """What autogenerate does not compare: CHECK constraints by name, partial index filters."""
    with _with_connection(database) as connection:
        inspector = inspect(connection)
        for table in Base.metadata.sorted_tables:
            in_db = {c["name"] for c in inspector.get_check_constraints(table.name)}
            in_model = {
                c.name
                for c in table.constraints
                if c.__class__.__name__ == "CheckConstraint" and c.name
            }
            assert in_db == in_model, table.name
            db_indexes = {
                index["name"]: (index.get("dialect_options") or {}).get("postgresql_where")
                for index in inspector.get_indexes(table.name)
            }
            for index in table.indexes:
                where = index.dialect_options["postgresql"]["where"]
                assert index.name in db_indexes, index.name
                assert (db_indexes[index.name] is None) == (where is None), index.name
        assert set(inspector.get_table_names()) == TABLES | {"alembic_version"}


def test_one_head_and_the_database_is_at_it(database: str) -> None:
    script = ScriptDirectory.from_config(_config(database))
    heads = script.get_heads()
    assert len(heads) == 1
    with _with_connection(database) as connection:
        assert MigrationContext.configure(connection).get_current_heads() == tuple(heads)


def _reloptions(connection: Connection, table: str) -> list[str]:
    options = connection.scalar(
        text("SELECT reloptions FROM pg_class WHERE oid = CAST(:table AS regclass)"),
        {"table": table},
    )
    return sorted(options or [])


def test_transfers_are_vacuumed_every_10000_changed_rows(scratch_url: str) -> None:
    """The settlement queue's dead entries are cleaned long before a fifth of the table
    has changed (migration 0002); downgrading to 0001 gives the defaults back."""
    _create_empty(scratch_url)
    config = _config(scratch_url)
    command.upgrade(config, "head")
    expected = ["autovacuum_vacuum_scale_factor=0", "autovacuum_vacuum_threshold=10000"]
    with _with_connection(scratch_url) as connection:
        assert _reloptions(connection, "transfers") == expected
    command.downgrade(config, "0001")
    with _with_connection(scratch_url) as connection:
        assert _reloptions(connection, "transfers") == []
    command.upgrade(config, "head")
    with _with_connection(scratch_url) as connection:
        assert _reloptions(connection, "transfers") == expected


# --- down and up --------------------------------------------------------------------------


def _user_tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) - {"alembic_version"}


def test_downgrade_to_base_and_upgrade_to_head(scratch_url: str) -> None:
    _create_empty(scratch_url)
    config = _config(scratch_url)
    command.upgrade(config, "head")
    with _with_connection(scratch_url) as connection:
        assert _user_tables(connection) == TABLES
        # Some life in it, so that the downgrade has rows and foreign keys to get past.
        user_id = connection.scalar(
            text("INSERT INTO users (username, password_hash) VALUES ('x', '!') RETURNING id")
        )
        connection.execute(
            text("INSERT INTO accounts (user_id, currency) VALUES (:id, 'USD')"), {"id": user_id}
        )
        connection.commit()

    command.downgrade(config, "base")
    with _with_connection(scratch_url) as connection:
        assert _user_tables(connection) == set()
        assert MigrationContext.configure(connection).get_current_heads() == ()
        sequences = connection.execute(
            text("SELECT sequence_name FROM information_schema.sequences")
        ).all()
        assert sequences == []

    command.upgrade(config, "head")
    with _with_connection(scratch_url) as connection:
        assert _user_tables(connection) == TABLES
        assert _diff(connection, Base.metadata) == []
        _assert_seed(connection, password=None)
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1


# --- the seed -----------------------------------------------------------------------------


def _assert_seed(connection: Connection, password: str | None) -> None:
    currencies = connection.execute(
        text(
            "SELECT code, name, decimals, commission_rate, commission_account_id, "
            "external_account_id FROM currencies ORDER BY code"
        )
    ).all()
    assert {row[0]: tuple(row[1:4]) for row in currencies} == SEED_CURRENCIES
    for _, _, decimals, rate, *_ in currencies:
        assert isinstance(rate, Decimal)
        assert isinstance(decimals, int)

    superuser = connection.execute(
        text("SELECT id, username, password_hash FROM users WHERE id = :id"),
        {"id": SUPERUSER_ID},
    ).one()
    assert superuser[:2] == (1, "superuser")
    if password is not None:
        assert PasswordHasher().verify(superuser[2], password)
        with pytest.raises(VerifyMismatchError):
            PasswordHasher().verify(superuser[2], password + "x")

    accounts = connection.execute(
        text(
            "SELECT id, currency, kind, balance FROM accounts WHERE user_id = :id "
            "AND kind IN ('commission', 'external') ORDER BY id"
        ),
        {"id": SUPERUSER_ID},
    ).all()
    by_role = {(currency, kind): account_id for account_id, currency, kind, _ in accounts}
    # Exactly one commission and one external account per currency, nobody else's.
    assert len(accounts) == 6
    assert set(by_role) == {(c, k) for c in SEED_CURRENCIES for k in ("commission", "external")}
    others = connection.scalar(
        text("SELECT count(*) FROM accounts WHERE kind <> 'user' AND user_id <> :id"),
        {"id": SUPERUSER_ID},
    )
    assert others == 0
    for code, _, _, _, commission_id, external_id in currencies:
        assert commission_id == by_role[(code, "commission")]
        assert external_id == by_role[(code, "external")]


def _assert_fresh_balances(connection: Connection) -> None:
    assert connection.scalar(text("SELECT count(*) FROM accounts")) == 6
    assert connection.scalar(text("SELECT count(*) FROM accounts WHERE balance <> 0")) == 0
    assert connection.scalar(text("SELECT count(*) FROM transfers")) == 0
    assert connection.scalar(text("SELECT count(*) FROM postings")) == 0


def test_the_run_database_has_api_md_seed(database: str) -> None:
    with _with_connection(database) as connection:
        _assert_seed(connection, SUPERUSER_PASSWORD)


def test_migrate_seeds_a_new_database_and_is_idempotent(scratch_url: str) -> None:
    # migrate() creates the database itself, upgrades it and sets the superuser password.
    migrate(scratch_url)
    with _with_connection(scratch_url) as connection:
        _assert_seed(connection, SUPERUSER_PASSWORD)
        _assert_fresh_balances(connection)
        first_hash = connection.scalar(text("SELECT password_hash FROM users WHERE id = 1"))

    migrate(scratch_url)
    with _with_connection(scratch_url) as connection:
        _assert_seed(connection, SUPERUSER_PASSWORD)
        _assert_fresh_balances(connection)
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1
        assert connection.scalar(text("SELECT count(*) FROM currencies")) == 3
        # A matching hash is kept, not re-hashed on every deploy.
        assert connection.scalar(text("SELECT password_hash FROM users WHERE id = 1")) == (
            first_hash
        )
        # The next registered user gets id 2: the seed moved the id sequence past 1.
        new_id = connection.scalar(
            text("INSERT INTO users (username, password_hash) VALUES ('next', '!') RETURNING id")
        )
        assert new_id == 2
        connection.rollback()

    # A password changed behind migrate's back is set again from SUPERUSER_PASSWORD.
    set_superuser_password(scratch_url, "changed by someone else")
    migrate(scratch_url)
    with _with_connection(scratch_url) as connection:
        _assert_seed(connection, SUPERUSER_PASSWORD)


def test_upgrade_leaves_the_password_unusable_until_migrate_sets_it(scratch_url: str) -> None:
    _create_empty(scratch_url)
    command.upgrade(_config(scratch_url), "head")
    with _with_connection(scratch_url) as connection:
        stored = connection.scalar(text("SELECT password_hash FROM users WHERE id = 1"))
    # No password is baked into the migration: nobody can log in before migrate runs.
    assert not stored.startswith("$argon2")
    migrate(scratch_url)
    with _with_connection(scratch_url) as connection:
        _assert_seed(connection, SUPERUSER_PASSWORD)
