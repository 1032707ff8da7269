from __future__ import annotations

from flask import Blueprint, Response
from sqlalchemy import literal, select
from sqlalchemy.exc import SQLAlchemyError

from common.db import request_session
from web import throttle
from web.render import json_response

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    try:
        with request_session() as session:
            session.execute(select(literal(1)))
        database = "ok"
    except SQLAlchemyError:
        database = "unavailable"
    broker = "ok" if throttle.ping() else "unavailable"
    status = "ok" if database == broker == "ok" else "unavailable"
    body = {"status": status, "database": database, "broker": broker}
    return json_response(
        body, 200 if status == "ok" else 503, {"Retry-After": "5"} if status != "ok" else None
    )
