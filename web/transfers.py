from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from flask import Blueprint, Response
from sqlalchemy.orm import Session

from common import transfers
from common.db import Db, request_statements, request_transaction
from common.doorbells import Doorbells
from common.errors import RemitError
from common.models import TransferStatus
from common.render import transfer_json
from web import long_poll, overload
from web.access_log import log_on_access
from web.auth import authenticated, authorize_path_user
from web.fields import (
    BatchCreate,
    BatchItem,
    PayoutCreate,
    RefundCreate,
    TransferCreate,
    TransferListQuery,
    TransferWaitQuery,
    idempotency_key,
    parse_body,
    parse_query,
    validate,
)
from web.metrics import LONG_POLLS_UNHELD, TRANSFERS_ACCEPTED
from web.problems import ApiError, problem_body
from web.render import json_response, listed_page

bp = Blueprint("transfers", __name__)


# Coalesces this process's doorbells (rung after commit); flushed at exit.
doorbells = Doorbells()


Submitted = tuple[transfers.Accepted, dict[str, Any]]


def accept(
    submit: Callable[[Db], transfers.Accepted],
    unit: Callable[[Callable[[Db], Submitted]], Submitted] = request_statements,
) -> Response:
    """Run `submit` (a payment, deposit, refund or payout) on the request's hot path (or
    in `unit`, e.g. a transaction) and answer 202 with the transfer; ring the settlement
    doorbell for a new one (after commit)."""

    def submitted(db: Db) -> Submitted:
        accepted = submit(db)
        # Rendered on the same connection: the currency is cached after the first time.
        return accepted, transfer_json(db, accepted.transfer)

    accepted, body = unit(submitted)
    transfer = accepted.transfer
    if accepted.created:
        kind = transfer.kind
        TRANSFERS_ACCEPTED.labels(kind).inc()
        # Said by the request's access line, not a line of its own: a second log line
        # per payment is a measurable share of the API's CPU (see docs/decisions/).
        log_on_access(transfer_id=transfer.id, currency=transfer.currency, accepted=kind)
    if accepted.created or transfer.status == TransferStatus.PENDING:
        # A replay of a still-pending transfer rings again: if the first doorbell was
        # lost, the client's retry is the fastest way to get it settled.
        doorbells.ring_soon(transfer.currency, [transfer.id])
    location = f"/users/{transfer.from_user_id}/transfers/{transfer.id}"
    return json_response(body, 202, {"Location": location})


@bp.post("/users/<id:user_id>/transfers")
@authenticated
def submit(user_id: int) -> Response:
    authorize_path_user(user_id, write=True)
    fields = parse_body(TransferCreate)
    overload.check_account(fields.from_account, user_id)
    request = transfers.TransferRequest(
        from_account_id=fields.from_account,
        to_account_id=fields.to_account,
        amount=fields.amount,
        comment=fields.comment,
        idempotency_key=idempotency_key(),
    )
    return accept(lambda db: transfers.submit_transfer(db, user_id, request))


@bp.post("/users/<id:user_id>/transfers/<id:transfer_id>/refunds")
@authenticated
def refund(user_id: int, transfer_id: int) -> Response:
    """Give back (part of) a settled payment the user received (docs/api.md "Refunds")."""
    authorize_path_user(user_id, write=True)
    fields = parse_body(RefundCreate)
    overload.check_transfer(transfer_id, user_id)
    key = idempotency_key()

    def submit(db: Db) -> transfers.Accepted:
        assert isinstance(db, Session)
        return transfers.submit_refund(
            db,
            user_id,
            transfer_id,
            amount=fields.amount,
            comment=fields.comment,
            idempotency_key=key,
        )

    # A transaction: the room claimed on the original and the refund commit together.
    return accept(submit, request_transaction)


@bp.post("/users/<id:user_id>/payouts")
@authenticated
def payout(user_id: int) -> Response:
    """Money out to the currency's external account (docs/api.md "Payouts")."""
    authorize_path_user(user_id, write=True)
    fields = parse_body(PayoutCreate)
    overload.check_account(fields.from_account, user_id)
    key = idempotency_key()
    return accept(
        lambda db: transfers.submit_payout(
            db,
            user_id,
            from_account_id=fields.from_account,
            amount=fields.amount,
            destination=fields.destination,
            comment=fields.comment,
            idempotency_key=key,
        )
    )


@bp.post("/users/<id:user_id>/transfers/batch")
@authenticated
def submit_batch(user_id: int) -> Response:
    """Up to 1000 transfers in one request, each accepted or refused on its own."""
    authorize_path_user(user_id, write=True)
    items = parse_body(BatchCreate).transfers
    results, to_ring, created = request_transaction(
        lambda session: _accept_items(session, user_id, items)
    )
    for currency, ids in to_ring.items():
        doorbells.ring_soon(currency, ids)
    if created:
        TRANSFERS_ACCEPTED.labels("transfer").inc(len(created))
        log_on_access(transfer_ids=created, accepted="transfer")
    return json_response({"results": results}, 202)


def _accept_items(
    session: Session, user_id: int, items: list[object]
) -> tuple[list[dict[str, Any]], dict[str, list[int]], list[int]]:
    """Each item validated as the single route would, then accepted in bulk."""
    results: list[dict[str, Any] | None] = [None] * len(items)
    requests: list[tuple[int, transfers.TransferRequest]] = []
    for index, item in enumerate(items):
        try:
            fields = validate(BatchItem, item)  # type: ignore[arg-type]
        except ApiError as error:
            results[index] = _item_error(error)
            continue
        request = transfers.TransferRequest(
            from_account_id=fields.from_account,
            to_account_id=fields.to_account,
            amount=fields.amount,
            comment=fields.comment,
            idempotency_key=fields.idempotency_key,
        )
        requests.append((index, request))
    # Items in a currency whose settlement lags are refused, each on its own.
    lagging = overload.lagging_accounts(session, [r.from_account_id for _, r in requests], user_id)
    for index, request in requests:
        if request.from_account_id in lagging:
            results[index] = _item_error(overload.backlog_error(lagging[request.from_account_id]))
    requests = [(i, r) for i, r in requests if r.from_account_id not in lagging]
    to_ring: dict[str, list[int]] = {}
    created: list[int] = []
    outcomes = transfers.submit_transfers(session, user_id, [r for _, r in requests])
    for (index, _), outcome in zip(requests, outcomes, strict=True):
        if isinstance(outcome, RemitError):
            results[index] = _item_error(outcome)
            continue
        transfer = outcome.transfer
        if outcome.created:
            created.append(transfer.id)
        if transfer.status == TransferStatus.PENDING:
            to_ring.setdefault(transfer.currency, []).append(transfer.id)
        results[index] = {"status": 202, "transfer": transfer_json(session, transfer)}
    return [result for result in results if result is not None], to_ring, created


def _item_error(error: ApiError | RemitError) -> dict[str, Any]:
    body = problem_body(error.code, error.detail)
    return {"status": body["status"], "error": body}


@bp.get("/users/<id:user_id>/transfers/<id:transfer_id>")
@authenticated
def get(user_id: int, transfer_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    wait = parse_query(TransferWaitQuery).wait
    if not wait:
        return json_response(_read_visible(transfer_id, user_id))
    read = partial(_read_visible, transfer_id, user_id)
    held = long_poll.held(transfer_id, read, float(wait))
    if held is not None:
        return json_response(held)
    # Every slot is held: rather than take a thread that a payment needs for the whole
    # wait, wait a moment if a grace slot is free, else not at all, and answer. A client
    # still waiting is told when to ask again.
    LONG_POLLS_UNHELD.inc()
    body = long_poll.grace(transfer_id, read, float(wait))
    if body is None:
        body = read()
    retry = {"Retry-After": "1"} if body["status"] == TransferStatus.PENDING else None
    return json_response(body, 200, retry)


def _read_visible(transfer_id: int, user_id: int) -> dict[str, Any]:
    def read(db: Db) -> dict[str, Any]:
        return transfer_json(db, transfers.get_visible_transfer(db, transfer_id, user_id))

    return request_statements(read)


@bp.get("/users/<id:user_id>/transfers")
@authenticated
def list_(user_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    query = parse_query(TransferListQuery)
    filters = transfers.TransferFilter(
        payer_id=query.payer,
        payee_id=query.payee,
        status=TransferStatus(query.status) if query.status else None,
    )

    def fetch(session: Session, descending: bool, after_id: int | None, limit: int) -> Any:
        return transfers.list_transfers(
            session, user_id, filters, descending=descending, after_id=after_id, limit=limit
        )

    return listed_page(query, fetch, transfer_json)
