"""Overload (docs/api.md "Overload", docs/decisions/0038): no new work in a currency
whose settlement lags behind, and 503 while every hashing slot is taken.

Each process keeps which currencies lag and reads it again at most every
`REFRESH_S` seconds (common.backlog.settlement_lag, bounded queries on the partial
indexes): a POST pays nothing for the bound while no currency lags, and one lookup of
its currency while one does.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from flask import current_app

from common import backlog
from common.db import Db, request_statements
from common.settings import Settings
from web.context import current_settings
from web.problems import ApiError

REFRESH_S = 1.0
# What a refused client is told to wait: a backlog takes seconds to clear.
BACKLOG_RETRY_AFTER_S = 5
EXTENSION = "remit.backlog"


class Backlog:
    """The currencies whose settlement lags, as this process last read them."""

    def __init__(self, settings: Settings) -> None:
        self.max_age_s = settings.max_pending_age_s
        self.max_pending = settings.max_pending
        self._lagging: frozenset[str] = frozenset()
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def lagging(self) -> frozenset[str]:
        # One thread reads again; the others go on with what was last read.
        if time.monotonic() - self._read_at >= REFRESH_S and self._lock.acquire(blocking=False):
            try:
                if time.monotonic() - self._read_at >= REFRESH_S:
                    self._lagging = request_statements(self._read)
                    self._read_at = time.monotonic()
            finally:
                self._lock.release()
        return self._lagging

    def _read(self, db: Db) -> frozenset[str]:
        lags = backlog.settlement_lag(db, self.max_age_s, self.max_pending)
        return frozenset(
            lag.currency
            for lag in lags
            if (lag.oldest_s or 0.0) > self.max_age_s or lag.pending > self.max_pending
        )

    def forget(self) -> None:
        """Read again on the next check (tests)."""
        self._read_at = -math.inf


def current_backlog() -> Backlog:
    extensions = current_app.extensions
    found: Backlog | None = extensions.get(EXTENSION)
    if found is None:
        found = extensions.setdefault(EXTENSION, Backlog(current_settings()))
    assert found is not None
    return found


def backlog_error(currency: str) -> ApiError:
    return ApiError(
        "service_unavailable",
        f"settlement of {currency} is behind; try again later",
        {"Retry-After": str(BACKLOG_RETRY_AFTER_S)},
    )


def _refuse(lookup: Callable[[Db], str | None]) -> None:
    lagging = current_backlog().lagging()
    if not lagging:
        return
    # An unknown account, transfer or hold, or another user's: the route answers its
    # own 404, as it would without a backlog.
    currency = request_statements(lookup)
    if currency in lagging:
        raise backlog_error(currency)


def check_account(account_id: int, user_id: int | None) -> None:
    """503 when the currency of `user_id`'s account lags (new transfers, payouts,
    holds); any user's account for None (deposits)."""
    _refuse(lambda db: backlog.account_currencies(db, [account_id], user_id).get(account_id))


def check_transfer(transfer_id: int, user_id: int) -> None:
    """503 when the currency of a transfer `user_id` sees lags (refunds)."""
    _refuse(lambda db: backlog.transfer_currency(db, transfer_id, user_id))


def check_hold(hold_id: int, user_id: int) -> None:
    """503 when the currency of a hold `user_id` sees lags (captures, voids)."""
    _refuse(lambda db: backlog.hold_currency(db, hold_id, user_id))


def lagging_accounts(db: Db, account_ids: list[int], user_id: int) -> dict[int, str]:
    """Of `user_id`'s accounts among these, those whose currency lags, with it (a
    batch's items)."""
    lagging = current_backlog().lagging()
    if not lagging or not account_ids:
        return {}
    currencies = backlog.account_currencies(db, account_ids, user_id)
    return {id_: code for id_, code in currencies.items() if code in lagging}
