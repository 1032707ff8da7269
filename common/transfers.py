"""Accepting transfers (validation, commission, idempotency) and reading them back.

Accepting only records a `pending` row; the worker settles it (common.ledger).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from psycopg.rows import args_row, tuple_row
from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    any_,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    union,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session

from common.currencies import CurrencyInfo, get_currency
from common.db import Db, execute_direct
from common.errors import Conflict, Invalid, NotFound, RemitError
from common.limits import BIGINT_MAX
from common.logs import request_id as current_request_id
from common.models import SUPERUSER_ID, Account, AccountKind, Transfer, TransferStatus
from common.money import InvalidAmount, amount_key, commission_for, format_amount, parse_amount


@dataclass(frozen=True)
class TransferRequest:
    from_account_id: int
    to_account_id: int
    amount: str
    comment: str = ""
    idempotency_key: str | None = None


TRANSFERS: Table = Transfer.__table__  # type: ignore[assignment]  # a mapped class's table
ACCOUNTS: Table = Account.__table__  # type: ignore[assignment]


class TransferRow(NamedTuple):
    """A transfer as the statements of this module read it: one row of `transfers`."""

    id: int
    status: str
    from_account_id: int
    to_account_id: int
    from_user_id: int
    to_user_id: int
    currency: str
    amount: int
    commission: int
    comment: str
    reason: str | None
    requested_by: int
    idempotency_key: str | None
    request_fingerprint: str | None
    request_id: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    settled_at: datetime | None
    kind: str
    refund_of: int | None
    refunded: int
    refunds_claimed: int
    hold_id: int | None
    destination: str | None


# Every statement here selects or returns these columns, in TransferRow's order, so
# psycopg builds TransferRows directly (args_row: one call per row, like a named tuple).
_TRANSFER_COLUMNS = tuple(TRANSFERS.c[name] for name in TransferRow._fields)
_TRANSFER_ROWS = args_row(TransferRow)


@dataclass(frozen=True)
class Accepted:
    transfer: TransferRow
    # False when an idempotent replay returned an earlier transfer.
    created: bool


def _fingerprint(kind: str, request: TransferRequest, *extra: str) -> str:
    # `extra` (a payout's destination) is appended only when given: the fingerprints
    # already stored for transfers and deposits stay as they were.
    return request_fingerprint(
        kind,
        request.from_account_id,
        request.to_account_id,
        amount_key(request.amount),
        request.comment,
        *extra,
    )


def request_fingerprint(*parts: object) -> str:
    """What an Idempotency-Key's request is compared by: a digest of its fields."""
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()


_BY_KEY = select(*_TRANSFER_COLUMNS).where(
    TRANSFERS.c.requested_by == bindparam("requested_by"),
    TRANSFERS.c.idempotency_key == bindparam("key"),
)


def _replay(db: Db, requested_by: int, key: str, fingerprint: str) -> TransferRow | None:
    params = {"requested_by": requested_by, "key": key}
    existing = execute_direct(db, _BY_KEY, params, _TRANSFER_ROWS).fetchone()
    if existing is not None and existing.request_fingerprint != fingerprint:
        raise Invalid(
            "idempotency_key_mismatch",
            "this Idempotency-Key was used with different fields",
        )
    return existing


def _amount_in(currency: CurrencyInfo, amount: str) -> int:
    try:
        return parse_amount(amount, currency.decimals)
    except InvalidAmount as error:
        raise Invalid("invalid_amount", f"{error} for {currency.code}") from None


class AccountRef(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def user_id(self) -> int: ...
    @property
    def currency(self) -> str: ...
    @property
    def kind(self) -> str: ...


@dataclass(frozen=True)
class _Account:
    id: int
    user_id: int
    currency: str
    kind: str


_ACCOUNTS = select(ACCOUNTS.c.id, ACCOUNTS.c.user_id, ACCOUNTS.c.currency, ACCOUNTS.c.kind).where(
    ACCOUNTS.c.id == any_(bindparam("ids", type_=ARRAY(ACCOUNTS.c.id.type)))
)
_ACCOUNT_ROWS = args_row(_Account)

# An account's owner and currency never change and accounts are never deleted, so
# once read they are kept: a payment needs no query to check its accounts. Bounded;
# when full it starts again empty (an account missing here only costs a query).
ACCOUNT_CACHE_SIZE = 200_000
_account_cache: dict[int, _Account] = {}
_account_cache_lock = threading.Lock()


def _accounts(db: Db, *ids: int) -> dict[int, AccountRef]:
    """The accounts of one transfer (or of a whole batch): from the cache, and the rest
    in one round trip."""
    wanted = set(ids)
    with _account_cache_lock:
        found: dict[int, AccountRef] = {i: _account_cache[i] for i in wanted if i in _account_cache}
    missing = wanted - found.keys()
    if missing:
        rows = execute_direct(db, _ACCOUNTS, {"ids": sorted(missing)}, _ACCOUNT_ROWS)
        read = {row.id: row for row in rows}
        with _account_cache_lock:
            if len(_account_cache) + len(read) > ACCOUNT_CACHE_SIZE:
                _account_cache.clear()
            _account_cache.update(read)
        found.update(read)
    return found


def _row(
    db: Db,
    *,
    kind: str,
    requested_by: int,
    source: AccountRef,
    target: AccountRef,
    request: TransferRequest,
    refund_of: int | None = None,
    destination: str | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """The transfer's row, once every rule that needs no lock has passed.
    `fingerprint`: the request's, when it is not `_fingerprint(kind, request)`."""
    if source.id == target.id:
        raise Invalid("same_account", "from and to are the same account")
    if source.currency != target.currency:
        raise Invalid(
            "currency_mismatch",
            f"cannot move {source.currency} into a {target.currency} account",
        )
    currency = get_currency(db, source.currency)
    amount = _amount_in(currency, request.amount)
    # A refund gives back the amount only: the original's commission is kept.
    free = kind in ("deposit", "refund") or source.user_id == target.user_id
    commission = 0 if free else commission_for(amount, currency.commission_rate)
    # The debit must fit the BIGINT columns it ends up in.
    if amount + commission > BIGINT_MAX:
        raise Invalid("invalid_amount", "amount is too large")
    return {
        "kind": kind,
        "from_account_id": source.id,
        "to_account_id": target.id,
        "from_user_id": source.user_id,
        "to_user_id": target.user_id,
        "currency": currency.code,
        "amount": amount,
        "commission": commission,
        "comment": request.comment,
        "requested_by": requested_by,
        "idempotency_key": request.idempotency_key,
        "request_fingerprint": (
            (fingerprint or _fingerprint(kind, request)) if request.idempotency_key else None
        ),
        "request_id": current_request_id.get(),
        "refund_of": refund_of,
        "destination": destination,
        "hold_id": None,
    }


# The columns _row fills: the statement is built and compiled once, the row is its
# parameters.
_ROW_COLUMNS = (
    "kind",
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
    "refund_of",
    "destination",
    "hold_id",
)
_INSERT_ONE = (
    insert(TRANSFERS)
    .values({column: bindparam(column) for column in _ROW_COLUMNS})
    .on_conflict_do_nothing(index_elements=["requested_by", "idempotency_key"])
    .returning(*_TRANSFER_COLUMNS)
)
# Many rows in one statement of fixed text (compiled once, whatever the count): one
# array per column. Ids come from the sequence in the arrays' order.
_INSERT_MANY = (
    insert(TRANSFERS)
    .from_select(
        _ROW_COLUMNS,
        select(literal_column("*")).select_from(
            func.unnest(
                *(cast(bindparam(name), ARRAY(TRANSFERS.c[name].type)) for name in _ROW_COLUMNS)
            )
        ),
    )
    .returning(*_TRANSFER_COLUMNS)
)
_BY_ID = select(*_TRANSFER_COLUMNS).where(TRANSFERS.c.id == bindparam("id"))


def insert_transfer(db: Db, row: dict[str, Any]) -> TransferRow | None:
    """Insert one transfer (a value for every column of _ROW_COLUMNS); None when its
    Idempotency-Key is already taken."""
    # Core, not ORM: the row comes back as a plain row, which is all the response needs.
    return execute_direct(db, _INSERT_ONE, row, _TRANSFER_ROWS).fetchone()


def _record(db: Db, row: dict[str, Any]) -> Accepted:
    """Insert one transfer's row, or return the earlier transfer of its Idempotency-Key."""
    # ON CONFLICT waits for a concurrent insert of the same key to commit, then does
    # nothing: of twenty simultaneous requests with one key, one row wins and the
    # others read it back below.
    transfer = insert_transfer(db, row)
    if transfer is not None:
        return Accepted(transfer, created=True)
    assert row["idempotency_key"] is not None
    existing = _replay(db, row["requested_by"], row["idempotency_key"], row["request_fingerprint"])
    assert existing is not None
    return Accepted(existing, created=False)


def submit_transfer(db: Db, user_id: int, request: TransferRequest) -> Accepted:
    """Accept a payment from one of `user_id`'s accounts, or replay an idempotent one."""
    if request.idempotency_key is not None:
        existing = _replay(db, user_id, request.idempotency_key, _fingerprint("transfer", request))
        if existing is not None:
            return Accepted(existing, created=False)
    accounts = _accounts(db, request.from_account_id, request.to_account_id)
    return _record(db, _transfer_row(db, accounts, user_id, request))


def _transfer_row(
    db: Db, accounts: dict[int, AccountRef], user_id: int, request: TransferRequest
) -> dict[str, Any]:
    """The row of a payment from one of `user_id`'s accounts, its accounts read already."""
    source = accounts.get(request.from_account_id)
    if source is None or source.user_id != user_id:
        raise NotFound("account_not_found", f"you have no account {request.from_account_id}")
    target = accounts.get(request.to_account_id)
    # The superuser's commission and external accounts take no payments: money leaves
    # only by payouts, and commission only by settlement.
    if target is None or target.kind != AccountKind.USER:
        raise NotFound("account_not_found", f"no account {request.to_account_id}")
    return _row(
        db,
        kind="transfer",
        requested_by=user_id,
        source=source,
        target=target,
        request=request,
    )


def submit_transfers(
    session: Session, user_id: int, requests: Sequence[TransferRequest]
) -> list[Accepted | RemitError]:
    """Many transfers from one user (the batch route), each accepted or refused on its
    own, in order: their accounts are read in one query and every transfer without an
    Idempotency-Key is inserted in one statement (keyed ones go one by one, for their
    replay rules). Nothing here can fail in the database for one item alone: every
    rule is checked before the insert."""
    accounts = _accounts(
        session, *(i for r in requests for i in (r.from_account_id, r.to_account_id))
    )
    results: list[Accepted | RemitError | None] = [None] * len(requests)
    plain: list[tuple[int, dict[str, Any]]] = []
    for index, request in enumerate(requests):
        try:
            if request.idempotency_key is not None:
                results[index] = submit_transfer(session, user_id, request)
                continue
            row = _transfer_row(session, accounts, user_id, request)
        except RemitError as error:
            results[index] = error
            continue
        plain.append((index, row))
    if plain:
        columns = {column: [row[column] for _, row in plain] for column in _ROW_COLUMNS}
        inserted = execute_direct(session, _INSERT_MANY, columns, _TRANSFER_ROWS).fetchall()
        # Ids come from the sequence in VALUES order: sorted ids match the rows' order.
        by_id = sorted(inserted, key=lambda transfer: transfer.id)
        for (index, _), transfer in zip(plain, by_id, strict=True):
            results[index] = Accepted(transfer, created=True)
    return [result for result in results if result is not None]


def submit_deposit(db: Db, account_id: int, amount: str, idempotency_key: str | None) -> Accepted:
    """Money from the outside world (the currency's external account) into an account."""
    target = _accounts(db, account_id).get(account_id)
    if target is None:
        raise NotFound("account_not_found", f"no account {account_id}")
    source = _external_account(db, target.currency)
    request = TransferRequest(
        from_account_id=source.id,
        to_account_id=target.id,
        amount=amount,
        idempotency_key=idempotency_key,
    )
    return _accept(
        db, kind="deposit", requested_by=SUPERUSER_ID, source=source, target=target, request=request
    )


def _external_account(db: Db, currency_code: str) -> AccountRef:
    """The currency's external account: where deposits come from and payouts go."""
    account_id = get_currency(db, currency_code).external_account_id
    account = _accounts(db, account_id).get(account_id)
    assert account is not None, "seed data is missing the external account"
    return account


def _accept(
    db: Db,
    *,
    kind: str,
    requested_by: int,
    source: AccountRef,
    target: AccountRef,
    request: TransferRequest,
    fingerprint: str | None = None,
    **extra: Any,
) -> Accepted:
    """The earlier transfer of the request's Idempotency-Key, or a new one of `kind`."""
    fingerprint = fingerprint or _fingerprint(kind, request)
    if request.idempotency_key is not None:
        existing = _replay(db, requested_by, request.idempotency_key, fingerprint)
        if existing is not None:
            return Accepted(existing, created=False)
    row = _row(
        db,
        kind=kind,
        requested_by=requested_by,
        source=source,
        target=target,
        request=request,
        fingerprint=fingerprint,
        **extra,
    )
    return _record(db, row)


# --- refunds and payouts (docs/api.md "Refunds", "Payouts") -----------------------------

REFUNDABLE_KINDS = ("transfer", "capture")

# The original, locked for the rest of the refund's transaction: concurrent refunds of
# one transfer (and replays of one key) take their turns here. NO KEY UPDATE: the
# refund's own foreign key to it (KEY SHARE) does not conflict.
_ORIGINAL = (
    select(*_TRANSFER_COLUMNS)
    .where(TRANSFERS.c.id == bindparam("id"))
    .with_for_update(key_share=True)
)
# The room a refund takes on its original, in one statement that cannot overfill it
# (the CHECK refunds_claimed <= amount is the database's backstop).
_CLAIM = (
    update(TRANSFERS)
    .where(
        TRANSFERS.c.id == bindparam("id"),
        TRANSFERS.c.refunds_claimed + bindparam("claim") <= TRANSFERS.c.amount,
    )
    .values(refunds_claimed=TRANSFERS.c.refunds_claimed + bindparam("claim"))
    .returning(TRANSFERS.c.id)
)
_UNCLAIM = (
    update(TRANSFERS)
    .where(TRANSFERS.c.id == bindparam("id"))
    .values(refunds_claimed=TRANSFERS.c.refunds_claimed - bindparam("claim"))
)


def _refund_fingerprint(transfer_id: int, amount: str | None, comment: str) -> str:
    # A defaulted amount is "" (not the amount it came to): a replay matches whatever
    # was left to refund when the first request came.
    given = "" if amount is None else amount_key(amount)
    return request_fingerprint("refund", transfer_id, given, comment)


def submit_refund(
    session: Session,
    user_id: int,
    transfer_id: int,
    *,
    amount: str | None,
    comment: str,
    idempotency_key: str | None,
) -> Accepted:
    """Give back (part of) a settled payment `user_id` received: a `refund` transfer the
    other way, its room claimed on the original. One transaction: the caller's."""
    original = execute_direct(session, _ORIGINAL, {"id": transfer_id}, _TRANSFER_ROWS).fetchone()
    if original is None or original.to_user_id != user_id:
        raise NotFound("transfer_not_found", f"no transfer {transfer_id} paid to this user")
    fingerprint = _refund_fingerprint(transfer_id, amount, comment)
    # After the lock: an earlier request with this key has committed (or failed) by now.
    if idempotency_key is not None:
        existing = _replay(session, user_id, idempotency_key, fingerprint)
        if existing is not None:
            return Accepted(existing, created=False)
    if original.kind not in REFUNDABLE_KINDS:
        raise Conflict("not_refundable", f"a {original.kind} cannot be refunded")
    if original.status != TransferStatus.SETTLED:
        raise Conflict("transfer_not_settled", f"transfer {transfer_id} is {original.status}")
    currency = get_currency(session, original.currency)
    if amount is None:
        left = original.amount - original.refunds_claimed
        if left <= 0:
            raise Conflict("refund_exceeds_transfer", "nothing is left to refund")
        amount = format_amount(left, currency.decimals)
    claim = _amount_in(currency, amount)
    params = {"id": transfer_id, "claim": claim}
    if execute_direct(session, _CLAIM, params, tuple_row).fetchone() is None:
        room = format_amount(original.amount - original.refunds_claimed, currency.decimals)
        raise Conflict(
            "refund_exceeds_transfer", f"at most {room} {currency.code} is left to refund"
        )
    accounts = _accounts(session, original.to_account_id, original.from_account_id)
    request = TransferRequest(
        from_account_id=original.to_account_id,
        to_account_id=original.from_account_id,
        amount=amount,
        comment=comment,
        idempotency_key=idempotency_key,
    )
    accepted = _record(
        session,
        _row(
            session,
            kind="refund",
            requested_by=user_id,
            source=accounts[original.to_account_id],
            target=accounts[original.from_account_id],
            request=request,
            refund_of=transfer_id,
            fingerprint=fingerprint,
        ),
    )
    if not accepted.created:
        # The key's transfer was there after all: this request claimed nothing.
        execute_direct(session, _UNCLAIM, params, tuple_row)
    return accepted


def submit_payout(
    db: Db,
    user_id: int,
    *,
    from_account_id: int,
    amount: str,
    destination: str,
    comment: str,
    idempotency_key: str | None,
) -> Accepted:
    """Money out of Remit: from one of `user_id`'s accounts to its currency's external
    account, with the commission of a payment to another user (the superuser)."""
    source = _accounts(db, from_account_id).get(from_account_id)
    if source is None or source.user_id != user_id:
        raise NotFound("account_not_found", f"you have no account {from_account_id}")
    target = _external_account(db, source.currency)
    request = TransferRequest(
        from_account_id=source.id,
        to_account_id=target.id,
        amount=amount,
        comment=comment,
        idempotency_key=idempotency_key,
    )
    return _accept(
        db,
        kind="payout",
        requested_by=user_id,
        source=source,
        target=target,
        request=request,
        fingerprint=_fingerprint("payout", request, destination),
        destination=destination,
    )


def get_visible_transfer(db: Db, transfer_id: int, user_id: int) -> TransferRow:
    """A transfer from or to `user_id`'s accounts (the superuser sees every transfer)."""
    transfer = execute_direct(db, _BY_ID, {"id": transfer_id}, _TRANSFER_ROWS).fetchone()
    if transfer is None or (
        user_id not in (transfer.from_user_id, transfer.to_user_id) and user_id != SUPERUSER_ID
    ):
        raise NotFound("transfer_not_found", f"no transfer {transfer_id} for this user")
    return transfer


@dataclass(frozen=True)
class TransferFilter:
    payer_id: int | None = None
    payee_id: int | None = None
    status: TransferStatus | None = None


def list_transfers(
    session: Session,
    user_id: int,
    filters: TransferFilter,
    *,
    descending: bool,
    after_id: int | None,
    limit: int,
) -> list[TransferRow]:
    """Transfers from or to the user's accounts, one page in id order."""
    query = transfers_page(user_id, filters, descending=descending, after_id=after_id, limit=limit)
    # On the connection: a Core query executed by the Session goes through ORM loading.
    return [TransferRow._make(row) for row in session.connection().execute(query)]


def transfers_page(
    user_id: int,
    filters: TransferFilter,
    *,
    descending: bool,
    after_id: int | None,
    limit: int,
) -> Select[Any]:
    """The query of one page: one index range scan per side (payer, payee) merged by
    UNION, so a page costs O(page) however many transfers the user has (the benchmark
    records its EXPLAIN ANALYZE at a million rows)."""
    conditions = []
    if filters.payer_id is not None:
        conditions.append(TRANSFERS.c.from_user_id == filters.payer_id)
    if filters.payee_id is not None:
        conditions.append(TRANSFERS.c.to_user_id == filters.payee_id)
    if filters.status is not None:
        conditions.append(TRANSFERS.c.status == filters.status.value)
    sides = (TRANSFERS.c.from_user_id, TRANSFERS.c.to_user_id)
    return both_sides_page(
        TRANSFERS, _TRANSFER_COLUMNS, user_id, sides, conditions,
        descending=descending, after_id=after_id, limit=limit,
    )  # fmt: skip


def both_sides_page(
    table: Table,
    columns: Sequence[ColumnElement[Any]],
    user_id: int,
    sides: tuple[ColumnElement[Any], ColumnElement[Any]],
    conditions: Sequence[ColumnElement[bool]],
    *,
    descending: bool,
    after_id: int | None,
    limit: int,
) -> Select[Any]:
    """One page in id order of the rows where `user_id` is on either side (payer or
    payee, maker or payee): each side's index range scanned for ids, merged by UNION,
    then the rows; O(page) however many the user has."""
    id_ = table.c.id
    if after_id is not None:
        conditions = [*conditions, id_ < after_id if descending else id_ > after_id]
    order = id_.desc() if descending else id_.asc()
    scans = [
        select(id_).where(and_(side == user_id, *conditions)).order_by(order).limit(limit)
        for side in sides
    ]
    # Rows, not ORM objects: a page is read, never changed, and building a hundred
    # mapped objects cost ten times the query.
    ids = select(union(*scans).subquery().c.id)
    return select(*columns).where(id_.in_(ids)).order_by(order).limit(limit)
