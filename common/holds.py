"""Holds as the web asks for them: recording a hold, a capture, a void (docs/api.md "Holds").

The web only records intents; the settler (common.ledger) reserves, releases, captures
and expires under the account locks it takes (docs/decisions/0036). Nothing here writes
`accounts`, and nothing here commits: the request's unit of work does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from psycopg.rows import args_row, tuple_row
from sqlalchemy import (
    BigInteger,
    Integer,
    Select,
    Table,
    bindparam,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from common.currencies import get_currency
from common.db import Db, execute_direct
from common.errors import Conflict, Invalid, NotFound
from common.logs import request_id as current_request_id
from common.models import SUPERUSER_ID, Hold, HoldStatus, Transfer, TransferStatus
from common.money import amount_key, commission_for
from common.transfers import (
    TransferRequest,
    _accounts,
    _amount_in,
    _transfer_row,
    both_sides_page,
    insert_transfer,
    request_fingerprint,
)

HOLDS: Table = Hold.__table__  # type: ignore[assignment]  # a mapped class's table
TRANSFERS: Table = Transfer.__table__  # type: ignore[assignment]

# docs/api.md: a hold lasts 60 s to 7 days, a week unless asked otherwise.
MIN_EXPIRES_IN = 60
MAX_EXPIRES_IN = 604_800


@dataclass(frozen=True)
class HoldRequest:
    from_account_id: int
    to_account_id: int
    amount: str
    comment: str = ""
    expires_in: int = MAX_EXPIRES_IN
    idempotency_key: str | None = None


class HoldRow(NamedTuple):
    """One row of `holds`, in the order every statement here selects it."""

    id: int
    status: str
    from_account_id: int
    to_account_id: int
    from_user_id: int
    to_user_id: int
    currency: str
    amount: int
    commission: int
    captured_amount: int | None
    transfer_id: int | None
    reason: str | None
    comment: str
    requested_by: int
    idempotency_key: str | None
    request_fingerprint: str | None
    request_id: str | None
    void_requested_at: datetime | None
    expires_at: datetime
    created_at: datetime
    updated_at: datetime


HOLD_COLUMNS = tuple(HOLDS.c[name] for name in HoldRow._fields)
HOLD_ROWS = args_row(HoldRow)


@dataclass(frozen=True)
class AcceptedHold:
    hold: HoldRow
    # False when an idempotent replay returned an earlier hold (or capture).
    created: bool


def _hold_fingerprint(request: HoldRequest) -> str:
    return request_fingerprint(
        "hold",
        request.from_account_id,
        request.to_account_id,
        amount_key(request.amount),
        request.comment,
        request.expires_in,
    )


_BY_KEY = select(*HOLD_COLUMNS).where(
    HOLDS.c.requested_by == bindparam("requested_by"),
    HOLDS.c.idempotency_key == bindparam("key"),
)
_BY_ID = select(*HOLD_COLUMNS).where(HOLDS.c.id == bindparam("id"))


def _mismatch() -> Invalid:
    return Invalid(
        "idempotency_key_mismatch", "this Idempotency-Key was used with different fields"
    )


def _replay(db: Db, requested_by: int, key: str, fingerprint: str) -> HoldRow | None:
    params = {"requested_by": requested_by, "key": key}
    existing = execute_direct(db, _BY_KEY, params, HOLD_ROWS).fetchone()
    if existing is not None and existing.request_fingerprint != fingerprint:
        raise _mismatch()
    return existing


_HOLD_COLUMNS_IN = (
    "from_account_id",
    "to_account_id",
    "from_user_id",
    "to_user_id",
    "currency",
    "amount",
    "commission",
    "comment",
    "requested_by",
    "idempotency_key",
    "request_fingerprint",
    "request_id",
)
_INSERT = (
    insert(HOLDS)
    .values(
        {
            **{column: bindparam(column) for column in _HOLD_COLUMNS_IN},
            # The database's clock, the one the settler compares expires_at with.
            "expires_at": func.statement_timestamp()
            + bindparam("expires_in", type_=Integer) * literal_column("interval '1 second'"),
        }
    )
    .on_conflict_do_nothing(index_elements=["requested_by", "idempotency_key"])
    .returning(*HOLD_COLUMNS)
)


def submit_hold(db: Db, user_id: int, request: HoldRequest) -> AcceptedHold:
    """Record a `pending` hold from one of `user_id`'s accounts, checked as a transfer
    is, or replay an idempotent one. The settler reserves it or rejects it."""
    fingerprint = _hold_fingerprint(request) if request.idempotency_key else None
    if request.idempotency_key is not None:
        assert fingerprint is not None
        existing = _replay(db, user_id, request.idempotency_key, fingerprint)
        if existing is not None:
            return AcceptedHold(existing, created=False)
    if not MIN_EXPIRES_IN <= request.expires_in <= MAX_EXPIRES_IN:
        raise Invalid(
            "invalid_request", f"expires_in: must be {MIN_EXPIRES_IN} to {MAX_EXPIRES_IN} seconds"
        )
    # Every rule of a payment applies (whose accounts, which currency, the amount, the
    # commission): the transfer's row is built and only its checked fields are kept.
    payment = TransferRequest(
        from_account_id=request.from_account_id,
        to_account_id=request.to_account_id,
        amount=request.amount,
        comment=request.comment,
    )
    accounts = _accounts(db, request.from_account_id, request.to_account_id)
    row = _transfer_row(db, accounts, user_id, payment)
    params = {column: row[column] for column in _HOLD_COLUMNS_IN}
    params.update(
        idempotency_key=request.idempotency_key,
        request_fingerprint=fingerprint,
        request_id=current_request_id.get(),
        expires_in=request.expires_in,
    )
    hold = execute_direct(db, _INSERT, params, HOLD_ROWS).fetchone()
    if hold is not None:
        return AcceptedHold(hold, created=True)
    # A concurrent request with the same key won: read its hold back.
    assert request.idempotency_key is not None
    assert fingerprint is not None
    existing = _replay(db, user_id, request.idempotency_key, fingerprint)
    assert existing is not None
    return AcceptedHold(existing, created=False)


def _not_found(hold_id: int) -> NotFound:
    return NotFound("hold_not_found", f"no hold {hold_id} for this user")


def get_visible_hold(db: Db, hold_id: int, user_id: int) -> HoldRow:
    """A hold `user_id` made or is the payee of (the superuser sees every hold)."""
    hold = execute_direct(db, _BY_ID, {"id": hold_id}, HOLD_ROWS).fetchone()
    if hold is None or (
        user_id not in (hold.from_user_id, hold.to_user_id) and user_id != SUPERUSER_ID
    ):
        raise _not_found(hold_id)
    return hold


_CAPTURE_STATUS = select(TRANSFERS.c.status).where(TRANSFERS.c.id == bindparam("id"))


def work_outstanding(db: Db, hold: HoldRow) -> bool:
    """Whether settlement has still something to do with the hold: reserve it, apply a
    void, or settle its capture (what `?wait=` waits for)."""
    if hold.status == HoldStatus.PENDING:
        return True
    if hold.status != HoldStatus.HELD:
        return False
    if hold.void_requested_at is not None:
        return True
    if hold.transfer_id is None:
        return False
    status = execute_direct(db, _CAPTURE_STATUS, {"id": hold.transfer_id}, tuple_row).fetchone()
    return status is not None and status[0] == TransferStatus.PENDING


@dataclass(frozen=True)
class HoldFilter:
    status: HoldStatus | None = None


def list_holds(
    session: Session,
    user_id: int,
    filters: HoldFilter,
    *,
    descending: bool,
    after_id: int | None,
    limit: int,
) -> list[HoldRow]:
    """Holds the user made or is the payee of, one page in id order."""
    query = holds_page(user_id, filters, descending=descending, after_id=after_id, limit=limit)
    return [HoldRow._make(row) for row in session.connection().execute(query)]


def holds_page(
    user_id: int,
    filters: HoldFilter,
    *,
    descending: bool,
    after_id: int | None,
    limit: int,
) -> Select[Any]:
    """One page of the holds the user made or is the payee of (ix_holds_from_user_id_id,
    ix_holds_to_user_id_id): O(page)."""
    conditions = []
    if filters.status is not None:
        conditions.append(HOLDS.c.status == filters.status.value)
    sides = (HOLDS.c.from_user_id, HOLDS.c.to_user_id)
    return both_sides_page(
        HOLDS, HOLD_COLUMNS, user_id, sides, conditions,
        descending=descending, after_id=after_id, limit=limit,
    )  # fmt: skip


# A capture takes the hold's row as the settler's claim does (FOR NO KEY UPDATE): the
# settler skips a row a capture holds, and a capture that comes after the settler
# locked it waits, then sees what the settler made of it (docs/decisions/0036).
_LOCK = select(*HOLD_COLUMNS).where(HOLDS.c.id == bindparam("id")).with_for_update(key_share=True)

_TRANSFER_BY_KEY = select(TRANSFERS.c.hold_id, TRANSFERS.c.request_fingerprint).where(
    TRANSFERS.c.requested_by == bindparam("requested_by"),
    TRANSFERS.c.idempotency_key == bindparam("key"),
)
_SET_CAPTURE = (
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("id"))
    .values(
        transfer_id=bindparam("transfer_id", type_=BigInteger), updated_at=func.clock_timestamp()
    )
    .returning(*HOLD_COLUMNS)
)


def _not_active(hold_id: int, doing: str) -> Conflict:
    return Conflict("hold_not_active", f"hold {hold_id} cannot be {doing} now")


def request_capture(
    session: Session,
    user_id: int,
    hold_id: int,
    amount: str | None,
    idempotency_key: str | None = None,
) -> AcceptedHold:
    """Ask for the capture of a held hold (by its maker): a `capture` transfer for
    `amount` (all by default), which the settler posts against the reservation.
    Runs in the caller's transaction.

    An Idempotency-Key is the capture transfer's: the same key and fields again answer
    the hold as it is now instead of 409."""
    hold = execute_direct(session, _LOCK, {"id": hold_id}, HOLD_ROWS).fetchone()
    if hold is None or hold.from_user_id != user_id:
        raise _not_found(hold_id)
    fingerprint = None
    if idempotency_key is not None:
        fingerprint = request_fingerprint("capture", hold_id, amount_key(amount) if amount else "")
        # Read under the hold's lock: a concurrent capture with this key has committed.
        earlier = execute_direct(
            session,
            _TRANSFER_BY_KEY,
            {"requested_by": user_id, "key": idempotency_key},
            tuple_row,
        ).fetchone()
        if earlier is not None:
            if earlier[0] != hold_id or earlier[1] != fingerprint:
                raise _mismatch()
            return AcceptedHold(hold, created=False)
    if (
        hold.status != HoldStatus.HELD
        or hold.transfer_id is not None
        or hold.void_requested_at is not None
    ):
        raise _not_active(hold_id, "captured")
    currency = get_currency(session, hold.currency)
    captured = hold.amount if amount is None else _amount_in(currency, amount)
    if not 0 < captured <= hold.amount:
        raise Invalid("invalid_amount", "amount: at most the held amount")
    free = hold.from_user_id == hold.to_user_id
    row = {
        "kind": "capture",
        "hold_id": hold.id,
        "from_account_id": hold.from_account_id,
        "to_account_id": hold.to_account_id,
        "from_user_id": hold.from_user_id,
        "to_user_id": hold.to_user_id,
        "currency": hold.currency,
        "amount": captured,
        "commission": 0 if free else commission_for(captured, currency.commission_rate),
        "comment": hold.comment,
        "requested_by": user_id,
        "idempotency_key": idempotency_key,
        "request_fingerprint": fingerprint,
        "request_id": current_request_id.get(),
        "refund_of": None,
        "destination": None,
    }
    inserted = insert_transfer(session, row)
    if inserted is None:
        # The key was taken after the read above, by a payment of another kind.
        raise _mismatch()
    params = {"id": hold.id, "transfer_id": inserted.id}
    updated = execute_direct(session, _SET_CAPTURE, params, HOLD_ROWS).fetchone()
    assert updated is not None
    return AcceptedHold(updated, created=True)


_VOID = (
    update(HOLDS)
    .where(
        HOLDS.c.id == bindparam("id"),
        # Literal, not bound: this statement is compiled once to plain text (compiled()).
        HOLDS.c.status.in_(
            [
                literal_column(f"'{HoldStatus.PENDING.value}'"),
                literal_column(f"'{HoldStatus.HELD.value}'"),
            ]
        ),
        HOLDS.c.transfer_id.is_(None),
        HOLDS.c.void_requested_at.is_(None),
    )
    .values(void_requested_at=func.clock_timestamp(), updated_at=func.clock_timestamp())
    .returning(*HOLD_COLUMNS)
)


def request_void(db: Db, user_id: int, hold_id: int) -> AcceptedHold:
    """Ask for a hold's release (by its maker or its payee); the settler applies it.
    Asking again while it is still to be applied answers the same."""
    hold = execute_direct(db, _BY_ID, {"id": hold_id}, HOLD_ROWS).fetchone()
    if hold is None or user_id not in (hold.from_user_id, hold.to_user_id):
        raise _not_found(hold_id)
    voided = execute_direct(db, _VOID, {"id": hold_id}, HOLD_ROWS).fetchone()
    if voided is not None:
        return AcceptedHold(voided, created=True)
    hold = execute_direct(db, _BY_ID, {"id": hold_id}, HOLD_ROWS).fetchone()
    assert hold is not None
    if (
        hold.status in (HoldStatus.PENDING, HoldStatus.HELD)
        and hold.transfer_id is None
        and hold.void_requested_at is not None
    ):
        return AcceptedHold(hold, created=False)
    raise _not_active(hold_id, "voided")
