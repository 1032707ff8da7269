"""What settlement has yet to do, as an operator watches it: pending transfers per
currency (how many, how old the oldest), failed transfers, and the doorbells waiting
in the broker. Read by /metrics (web.metrics) and the CLI's stats.

Cheap enough to read at every scrape: partial indexes on status, and one LLEN.

Also what the backlog bound reads (`settlement_lag`, web.overload): bounded queries on
the partial indexes of pending transfers and holds, at most once a second per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from psycopg.rows import args_row, tuple_row
from sqlalchemy import text
from sqlalchemy.orm import Session

from common import broker
from common.db import Db, execute_direct


@dataclass(frozen=True)
class PendingCurrency:
    currency: str
    count: int
    # Seconds since the oldest pending transfer of the currency was accepted.
    oldest_s: float


_PENDING = text(
    "SELECT currency, count(*) AS n, "
    "extract(epoch FROM clock_timestamp() - min(created_at))::float8 AS age "
    "FROM transfers WHERE status = 'pending' GROUP BY currency ORDER BY currency"
)
_FAILED = text("SELECT count(*) FROM transfers WHERE status = 'failed'")


def pending_by_currency(session: Session) -> list[PendingCurrency]:
    """Every currency with pending transfers, by code."""
    return [PendingCurrency(row.currency, row.n, row.age) for row in session.execute(_PENDING)]


def failed_count(session: Session) -> int:
    return session.scalar(_FAILED) or 0


def queue_depth() -> int:
    """Messages waiting in the broker's task queue (doorbells and sweeps)."""
    app = broker.producer()
    with app.connection_for_read() as connection:
        return int(connection.default_channel.client.llen(app.conf.task_default_queue))


@dataclass(frozen=True)
class Lag:
    """How far one currency's settlement is behind, as the backlog bound reads it."""

    currency: str
    # Seconds since the oldest pending transfer or hold was accepted (None: nothing).
    oldest_s: float | None
    # Pending transfers and holds, counted up to the query's cap each (0 when the
    # oldest is already too old: no need to count).
    pending: int


class _LagRow(NamedTuple):
    currency: str
    oldest_s: float | None
    pending: int


# Every currency, from the partial indexes on pending work: the first row of each
# (ordered by id, so the oldest) and a count that stops at :cap, skipped when the age
# alone already says the currency lags. Never a count of every pending row.
_LAG = text(
    "SELECT currency, oldest_s, CASE WHEN oldest_s > :max_age THEN 0 ELSE"
    " (SELECT count(*) FROM (SELECT 1 FROM transfers t"
    "   WHERE t.status = 'pending' AND t.currency = o.currency LIMIT :cap) AS p)"
    " + (SELECT count(*) FROM (SELECT 1 FROM holds h"
    "   WHERE h.status = 'pending' AND h.currency = o.currency LIMIT :cap) AS q)"
    " END AS pending "
    "FROM (SELECT c.code AS currency, extract(epoch FROM clock_timestamp() - least("
    # Never attempted: a transfer retried on its backoff schedule (or reopened by beat
    # after it failed) is old by nature, and must not stop its currency's new work.
    " (SELECT t.created_at FROM transfers t WHERE t.status = 'pending'"
    "   AND t.currency = c.code AND t.next_attempt_at IS NULL ORDER BY t.id LIMIT 1),"
    " (SELECT h.created_at FROM holds h"
    "   WHERE h.status = 'pending' AND h.currency = c.code ORDER BY h.id LIMIT 1)"
    "))::float8 AS oldest_s FROM currencies c) AS o"
)
_LAG_ROWS = args_row(_LagRow)


def settlement_lag(db: Db, max_age_s: float, max_pending: int) -> list[Lag]:
    """Each currency's lag; counts stop past `max_pending`."""
    params = {"max_age": max_age_s, "cap": max_pending + 1}
    return [Lag(*row) for row in execute_direct(db, _LAG, params, _LAG_ROWS)]


# Only what `user` may see (any, for None): the bound must not tell which ids exist.
_ACCOUNT_CURRENCIES = text(
    "SELECT id, currency FROM accounts WHERE id = ANY(:ids)"
    " AND (CAST(:user AS bigint) IS NULL OR user_id = :user)"
)
_TRANSFER_CURRENCY = text(
    "SELECT currency FROM transfers WHERE id = :id AND :user IN (from_user_id, to_user_id)"
)
_HOLD_CURRENCY = text(
    "SELECT currency FROM holds WHERE id = :id AND :user IN (from_user_id, to_user_id)"
)


class _AccountCurrency(NamedTuple):
    id: int
    currency: str


def account_currencies(db: Db, account_ids: list[int], user_id: int | None) -> dict[int, str]:
    """The currency of each of these accounts that exists and is `user_id`'s (any
    user's for None)."""
    params = {"ids": account_ids, "user": user_id}
    rows = execute_direct(db, _ACCOUNT_CURRENCIES, params, args_row(_AccountCurrency))
    return {row.id: row.currency for row in rows}


def transfer_currency(db: Db, transfer_id: int, user_id: int) -> str | None:
    """The currency of a transfer `user_id` pays or receives."""
    params = {"id": transfer_id, "user": user_id}
    row = execute_direct(db, _TRANSFER_CURRENCY, params, tuple_row).fetchone()
    return row[0] if row else None


def hold_currency(db: Db, hold_id: int, user_id: int) -> str | None:
    """The currency of a hold `user_id` made or is the payee of."""
    row = execute_direct(db, _HOLD_CURRENCY, {"id": hold_id, "user": user_id}, tuple_row).fetchone()
    return row[0] if row else None
