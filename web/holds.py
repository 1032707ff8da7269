"""Holds: authorize now, capture or void later (docs/api.md "Holds").

The routes record intents and ring the currency's settlement doorbell after commit;
the settler reserves, releases, captures and expires (docs/decisions/0036).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from flask import Blueprint, Response
from sqlalchemy.orm import Session

from common import holds
from common.db import Db, request_statements, request_transaction
from common.models import HoldStatus
from common.render import hold_json
from web import long_poll, overload
from web.auth import authenticated, authorize_path_user
from web.fields import (
    HoldCapture,
    HoldCreate,
    HoldListQuery,
    TransferWaitQuery,
    idempotency_key,
    parse_body,
    parse_query,
)
from web.metrics import LONG_POLLS_UNHELD
from web.render import json_response, listed_page
from web.transfers import doorbells

bp = Blueprint("holds", __name__)


def _answer(accepted: holds.AcceptedHold, body: dict[str, Any]) -> Response:
    """202 with the hold as it is now; the doorbell rings for work the settler has."""
    hold = accepted.hold
    # A replay rings again too: if the first doorbell was lost, the client's retry is
    # the fastest way to get the hold settled.
    if accepted.created or hold.status in (HoldStatus.PENDING, HoldStatus.HELD):
        doorbells.ring_soon(hold.currency, [hold.transfer_id] if hold.transfer_id else [])
    location = f"/users/{hold.from_user_id}/holds/{hold.id}"
    return json_response(body, 202, {"Location": location})


def _rendered(
    work: Callable[[Db], holds.AcceptedHold],
) -> Callable[[Db], tuple[holds.AcceptedHold, dict[str, Any]]]:
    def run(db: Db) -> tuple[holds.AcceptedHold, dict[str, Any]]:
        accepted = work(db)
        return accepted, hold_json(db, accepted.hold)

    return run


@bp.post("/users/<id:user_id>/holds")
@authenticated
def submit(user_id: int) -> Response:
    authorize_path_user(user_id, write=True)
    fields = parse_body(HoldCreate)
    overload.check_account(fields.from_account, user_id)
    request = holds.HoldRequest(
        from_account_id=fields.from_account,
        to_account_id=fields.to_account,
        amount=fields.amount,
        comment=fields.comment,
        expires_in=fields.expires_in,
        idempotency_key=idempotency_key(),
    )
    # One INSERT ... ON CONFLICT: correct alone, so no transaction round trips.
    accepted, body = request_statements(
        _rendered(lambda db: holds.submit_hold(db, user_id, request))
    )
    return _answer(accepted, body)


@bp.post("/users/<id:user_id>/holds/<id:hold_id>/capture")
@authenticated
def capture(user_id: int, hold_id: int) -> Response:
    authorize_path_user(user_id, write=True)
    amount = parse_body(HoldCapture).amount
    overload.check_hold(hold_id, user_id)
    key = idempotency_key()
    # The hold's lock, the capture transfer and the hold's transfer_id commit together.
    accepted, body = request_transaction(
        _rendered(lambda db: holds.request_capture(db, user_id, hold_id, amount, key))  # type: ignore[arg-type]
    )
    return _answer(accepted, body)


@bp.post("/users/<id:user_id>/holds/<id:hold_id>/void")
@authenticated
def void(user_id: int, hold_id: int) -> Response:
    authorize_path_user(user_id, write=True)
    overload.check_hold(hold_id, user_id)
    accepted, body = request_statements(
        _rendered(lambda db: holds.request_void(db, user_id, hold_id))
    )
    return _answer(accepted, body)


@bp.get("/users/<id:user_id>/holds/<id:hold_id>")
@authenticated
def get(user_id: int, hold_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    wait = parse_query(TransferWaitQuery).wait
    read = partial(_read_visible, hold_id, user_id)
    if not wait:
        return json_response(read()[0])
    answered = long_poll.held_hold(hold_id, read, float(wait))
    if answered is None:
        # Every slot is held: as for transfers, a moment on a grace slot or none.
        LONG_POLLS_UNHELD.inc()
        answered = long_poll.grace_hold(hold_id, read, float(wait)) or read()
    body, outstanding = answered
    return json_response(body, 200, {"Retry-After": "1"} if outstanding else None)


def _read_visible(hold_id: int, user_id: int) -> tuple[dict[str, Any], bool]:
    """The hold's resource, and whether settlement still has work on it."""

    def read(db: Db) -> tuple[dict[str, Any], bool]:
        hold = holds.get_visible_hold(db, hold_id, user_id)
        return hold_json(db, hold), holds.work_outstanding(db, hold)

    return request_statements(read)


@bp.get("/users/<id:user_id>/holds")
@authenticated
def list_(user_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    query = parse_query(HoldListQuery)
    filters = holds.HoldFilter(status=HoldStatus(query.status) if query.status else None)

    def fetch(session: Session, descending: bool, after_id: int | None, limit: int) -> Any:
        return holds.list_holds(
            session, user_id, filters, descending=descending, after_id=after_id, limit=limit
        )

    return listed_page(query, fetch, hold_json)
