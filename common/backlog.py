"""What settlement has yet to do, as an operator watches it: pending transfers per
currency (how many, how old the oldest), failed transfers, and the doorbells waiting
in the broker. Read by /metrics (web.metrics) and the CLI's stats.

Cheap enough to read at every scrape: partial indexes on status, and one LLEN.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import broker


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
