from __future__ import annotations

from flask import Blueprint, Response, request

from common import users
from common.db import request_transaction
from common.passwords import HashingBusy, hashing_free
from common.render import timestamp
from web import throttle
from web.context import current_settings
from web.fields import UserCreate, parse_body
from web.overload import pause_refused
from web.problems import HASHING_RETRY_AFTER_S, REGISTRATIONS_LIMITED, ApiError
from web.render import json_response

bp = Blueprint("users", __name__)


@bp.post("/users")
def register() -> Response:
    fields = parse_body(UserCreate)
    if not hashing_free():
        # The cheapest answer to a flood: no counting, no transaction (503, web.problems).
        pause_refused(current_settings(), HASHING_RETRY_AFTER_S)
        raise HashingBusy
    # Before the hash: a script's registrations must not cost an argon2 hash each.
    wait = throttle.registration_retry_after(request.remote_addr or "unknown")
    if wait is not None:
        pause_refused(current_settings(), wait)
        raise ApiError(
            "too_many_requests",
            REGISTRATIONS_LIMITED,
            {"Retry-After": str(wait)},
        )
    user = request_transaction(
        lambda session: users.register(session, fields.username, fields.password, fields.full_name)
    )
    body = {
        "id": user.id,
        "username": user.username,
        "full_name": user.full_name,
        "created_at": timestamp(user.created_at),
    }
    return json_response(body, 201, {"Location": f"/users/{user.id}"})
