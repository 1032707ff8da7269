"""Currencies are seed data that never change while the processes run: read once, keep."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from decimal import Decimal

from psycopg.rows import args_row
from sqlalchemy import func, literal_column, select

from common.db import Db, execute_direct
from common.errors import NotFound
from common.models import Currency


@dataclass(frozen=True)
class CurrencyInfo:
    code: str
    name: str
    decimals: int
    commission_rate: Decimal
    commission_account_id: int
    external_account_id: int


_lock = threading.Lock()
_known: dict[str, CurrencyInfo] = {}


# CurrencyInfo's fields, in order; an account id not set yet reads as 0.
_ALL = select(
    Currency.code,
    Currency.name,
    Currency.decimals,
    Currency.commission_rate,
    func.coalesce(Currency.commission_account_id, literal_column("0")),
    func.coalesce(Currency.external_account_id, literal_column("0")),
).order_by(Currency.code)
_ROWS = args_row(CurrencyInfo)


def _load(db: Db) -> dict[str, CurrencyInfo]:
    return {info.code: info for info in execute_direct(db, _ALL, {}, _ROWS)}


def all_currencies(db: Db) -> list[CurrencyInfo]:
    with _lock:
        if not _known:
            _known.update(_load(db))
        return list(_known.values())


def known_currency(code: str) -> CurrencyInfo | None:
    """The currency if this process has it cached: no session, no round trip."""
    with _lock:
        return _known.get(code)


def get_currency(db: Db, code: str) -> CurrencyInfo:
    with _lock:
        if code not in _known:
            # A currency added by a later migration is picked up without a restart.
            _known.update(_load(db))
        info = _known.get(code)
    if info is None:
        raise NotFound("currency_not_found", f"no currency {code!r}")
    return info
