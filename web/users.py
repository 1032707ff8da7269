from __future__ import annotations

from flask import Blueprint, Response

from common import users
from common.db import request_transaction
from common.render import timestamp
from web.fields import UserCreate, parse_body
from web.render import json_response

bp = Blueprint("users", __name__)


@bp.post("/users")
def register() -> Response:
    fields = parse_body(UserCreate)
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
