"""Currencies are seed data that never change while the processes run: read once, keep."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select

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


_ALL = select(*Currency.__table__.c).order_by(Currency.code)


def _load(db: Db) -> dict[str, CurrencyInfo]:
    rows = execute_direct(db, _ALL, {})
    return {
        row.code: CurrencyInfo(
            code=row.code,
            name=row.name,
            decimals=row.decimals,
            commission_rate=row.commission_rate,
            commission_account_id=row.commission_account_id or 0,
            external_account_id=row.external_account_id or 0,
        )
        for row in rows
    }


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
