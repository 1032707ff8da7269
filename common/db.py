"""The database engine, and one unit of work per use.

Which helper, where:

- A request (web/):
  - `request_statements(work)`: the hot paths (the credentials lookup, POST and GET of
    a transfer, a deposit). A pooled psycopg connection in autocommit; statements that
    are each correct alone, run by `execute_direct`.
  - `request_session()`: ORM reads (lists, an account, a statement, health). A session
    in autocommit.
  - `request_transaction(work)`: writes that must commit together (registration,
    opening an account, the batch route). One transaction, retried on deadlock.
- Settlement (worker/): `settlement_transaction(work)`, one transaction retried on
  deadlock, for a batch, a failed attempt and the sweep.
- A script (the CLI, tests): `script_session()`, a plain session whose transactions
  the script begins and ends itself (`session.begin()`). Migrations use an engine of
  their own (common.migrate): they may have to create the database first.

Which query style, where:

- ORM (mapped classes, `session.get`, `select(Account)`) for work that loads or changes
  whole objects off the hot paths: registration, accounts, statements, the CLI. A page
  that is only read and may be long (the transfers list) is a Core select run on the
  session's connection: typed rows, not mapped objects.
- Core statements built from the models, compiled once at import (`compiled`) and run
  by psycopg (`execute_direct`) with typed rows (`args_row` of a NamedTuple or dataclass)
  on the hot paths: the credentials lookup, accepting and reading transfers, the
  settlement batch. Rows, not ORM objects: building them costs more than the query.
- `text()` only for SQL that is PostgreSQL's own and clearer written out than composed:
  settlement's data-modifying CTEs over `unnest`, advisory locks, `make_interval`,
  settlement's row locks (`FOR NO KEY UPDATE [SKIP LOCKED]`), a partial index's
  predicate in statements run often (`status = 'failed'` as a literal: once psycopg
  prepares a statement, a generic plan cannot prove a bound value), the audit's
  invariant checks, and DDL (`CREATE DATABASE`). Anything a Core statement says as clearly is
  written in Core (docs/decisions/0008, 0028).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar, cast

import psycopg
from psycopg.rows import RowFactory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ClauseElement

from common.settings import Settings, get_settings

log = logging.getLogger(__name__)


def make_engine(settings: Settings) -> Engine:
    """An engine (and its pool) for `settings`; connects only when first used."""
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=5,
        # Errors and logs show statements, never their values: a failed INSERT INTO users
        # must not write a password hash (or anything a client sent) into the logs.
        hide_parameters=True,
        connect_args=connect_args(settings),
    )
    _ping_connections_that_sat_idle(engine)
    return engine


def connect_args(settings: Settings) -> dict[str, Any]:
    """psycopg's connection arguments, for PostgreSQL itself or through a pooler."""
    args: dict[str, Any] = {
        "connect_timeout": 5,
        "application_name": settings.db_application_name,
    }
    if settings.database_pooler == "pgbouncer":
        # Transaction pooling hands each transaction to any server connection: a statement
        # psycopg prepared (after 5 runs) on one is unknown to the next, and PgBouncer 1.18
        # refuses startup options. Its own idle_transaction_timeout ends a frozen client
        # instead (ops/pgbouncer.py; docs/decisions/0039).
        args["prepare_threshold"] = None
        return args
    # A process frozen inside a transaction (SIGSTOP, a stuck thread) would hold its
    # locks, the settlement lock of a whole currency included, for as long as it stays
    # frozen; PostgreSQL ends such a session after this long instead.
    args["options"] = "-c idle_in_transaction_session_timeout=" + str(
        int(settings.db_idle_in_transaction_timeout_s * 1000)
    )
    return args


@cache
def get_engine() -> Engine:
    """The process's engine, built on first use from the process's settings."""
    return make_engine(get_settings())


# A connection unused this long is checked with a round trip before it is handed out.
IDLE_BEFORE_PING_S = 1.0


def _ping_connections_that_sat_idle(engine: Engine) -> None:
    """Notice a dead connection (PostgreSQL restarted, backend terminated) on checkout,
    rather than failing a request's first statement. Only connections that sat idle are
    pinged: pool_pre_ping's round trip on every checkout cost the API a tenth of its
    time under load, when connections are never idle long enough to have died unseen
    (and a failure there invalidates the whole pool anyway)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.get("checked_in_at")
        if idle_since is None or time.monotonic() - idle_since < IDLE_BEFORE_PING_S:
            return
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()
        except Exception as error:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError(str(error)) from error


@cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@cache
def _autocommit_session_factory() -> sessionmaker[Session]:
    # Same pool; SQLAlchemy sets autocommit on checkout and restores it on return.
    return sessionmaker(
        bind=get_engine().execution_options(isolation_level="AUTOCOMMIT"),
        expire_on_commit=False,
    )


# Where a direct statement runs: a session (on its connection, in its transaction if it
# has one) or the psycopg connection of request_statements().
Db = Session | psycopg.Connection[Any]

R = TypeVar("R")


def execute_direct(
    db: Db, statement: ClauseElement, params: Mapping[str, Any], rows: RowFactory[R]
) -> psycopg.Cursor[R]:
    """Run a Core statement with psycopg itself; returns the cursor, whose rows `rows`
    builds (`args_row(SomeNamedTuple)` for a typed row, `tuple_row` for a value).

    For the hot paths (the credentials lookup, accepting a payment, reading a transfer,
    the settlement batch): SQLAlchemy's Core execution costs more than the round trip
    itself there. The statement is compiled from the models once (`compiled`), and
    errors reach the caller as SQLAlchemy's DBAPIError, so `is_outage` and
    `is_retryable` apply unchanged.
    """
    if isinstance(db, Session):
        pooled = db.connection()
        driver: psycopg.Connection[Any] = pooled.connection.driver_connection  # type: ignore[assignment]
    else:
        pooled, driver = None, db
    try:
        return driver.cursor(row_factory=rows).execute(compiled(statement), params)
    except psycopg.Error as error:
        broken = driver.broken or driver.closed
        if broken and pooled is not None:
            pooled.invalidate(error)
        raise _as_sqlalchemy_error(error, broken) from error


def _as_sqlalchemy_error(error: psycopg.Error, broken: bool) -> DBAPIError:
    """psycopg's error as SQLAlchemy would have raised it (OperationalError, ...)."""
    wrapped = DBAPIError.instance(
        None, None, error, psycopg.Error, hide_parameters=True, connection_invalidated=broken
    )
    # instance() wraps a DB-API error (psycopg's are) as a DBAPIError subclass.
    return cast(DBAPIError, wrapped)


@contextmanager
def _autocommit_connection() -> Iterator[psycopg.Connection[Any]]:
    """A pooled psycopg connection on which every statement is its own transaction:
    no BEGIN, COMMIT or ROLLBACK round trips, and no session to set up. For work whose
    statements are each correct alone (a lookup, an INSERT ... ON CONFLICT)."""
    try:
        pooled = get_engine().raw_connection()
    except psycopg.Error as error:
        # The pool could not connect: unlike Engine.connect(), it does not translate.
        raise _as_sqlalchemy_error(error, broken=True) from error
    driver: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
    try:
        driver.autocommit = True
        yield driver
    except BaseException as error:
        if driver.broken or driver.closed:
            pooled.invalidate(error if isinstance(error, Exception) else None)
        raise
    finally:
        if not (driver.broken or driver.closed):
            # Back to the pool as every pooled connection is: transactional.
            driver.autocommit = False
        pooled.close()


@cache
def compiled(statement: ClauseElement) -> str:
    """A Core statement as SQL text with psycopg's %(name)s parameters, compiled once.

    Only for statements built once at import time: the cache keeps every statement
    object it is given, so one built per request would grow it without end.
    """
    return str(statement.compile(dialect=get_engine().dialect))


def dispose_engine() -> None:
    """Drop pooled connections inherited across fork (gunicorn --preload, Celery prefork)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


# SQLSTATEs that mean "run the same transaction again": nothing of it was applied.
# 40001 serialization failure, 40P01 deadlock, 55P03 lock not available.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

T = TypeVar("T")


def is_retryable(error: BaseException) -> bool:
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return isinstance(error, DBAPIError) and sqlstate in RETRYABLE_SQLSTATES


def retrying(work: Callable[[], T], attempts: int = 5) -> T:
    """Run a whole transaction again on deadlock/serialization failure, never surfacing them."""
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except DBAPIError as error:
            if not is_retryable(error) or attempt == attempts:
                raise
            log.warning("retrying transaction after %s (attempt %d)", error.orig, attempt)
            # Jittered backoff so two retrying transactions do not collide again in step.
            time.sleep(random.uniform(0, 0.01 * 2**attempt))
    raise AssertionError("unreachable")


@contextmanager
def _transaction() -> Iterator[Session]:
    with _session_factory()() as session, session.begin():
        yield session


def _retried_transaction(work: Callable[[Session], T]) -> T:
    def attempt() -> T:
        with _transaction() as session:
            return work(session)

    return retrying(attempt)


# The units of work, one per use (the module docstring says which to use where).


def request_statements(work: Callable[[psycopg.Connection[Any]], T]) -> T:
    """A request's hot path: `work(connection)` on a pooled psycopg connection in
    autocommit, retried as a whole on deadlock. Every statement is its own transaction
    (no BEGIN, COMMIT or ROLLBACK round trips) and no session is set up, so `work`'s
    statements must each be correct alone: a lookup, an INSERT ... ON CONFLICT."""

    def attempt() -> T:
        with _autocommit_connection() as connection:
            return work(connection)

    return retrying(attempt)


def request_session() -> Session:
    """A request's ORM reads: a session in which every statement is a transaction of
    its own (no BEGIN/COMMIT/ROLLBACK round trips); it checks out a connection only
    when it first runs a statement. Use as `with request_session() as session:`."""
    return _autocommit_session_factory()()


def request_transaction(work: Callable[[Session], T]) -> T:
    """A request's writes that must commit together (registration, opening an account,
    the batch route): `work(session)` in one transaction, committed on return, rolled
    back on any exception, and retried as a whole on deadlock or serialization failure."""
    return _retried_transaction(work)


def settlement_transaction(work: Callable[[Session], T]) -> T:
    """The worker's unit of work (a settlement batch, a failed attempt, the sweep):
    `work(session)` in one transaction, retried as a whole on deadlock or serialization
    failure. The same rules as request_transaction today; its own name so that each
    call site says which use it serves, and either can change without the other."""
    return _retried_transaction(work)


def script_session() -> Session:
    """A session for scripts, the CLI and tests, which decide themselves where their
    transactions begin and end (`with script_session() as session, session.begin():`)."""
    return _session_factory()()


def is_outage(error: BaseException) -> bool:
    """The database cannot be reached or is going away: nothing to do but wait.

    Connection failures (no SQLSTATE, class 08), operator intervention (57P01-57P05:
    shutdown, terminated backend, cannot connect now) and a pool with no free
    connection. A statement timeout (57014) is not an outage: the server answered.
    """
    if isinstance(error, SQLAlchemyTimeoutError):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is None:
        return isinstance(error, OperationalError)
    return sqlstate.startswith("08") or sqlstate in {"57P01", "57P02", "57P03", "57P04", "57P05"}
