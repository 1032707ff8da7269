"""The event feed: a user's events in commit order (docs/api.md "Events")."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, request

from common import events
from common.db import Db, request_statements
from web.auth import authenticated, authorize_path_user
from web.fields import EventListQuery, parse_query
from web.render import json_response

bp = Blueprint("events", __name__)


@bp.get("/users/<id:user_id>/events")
@authenticated
def list_(user_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    query = parse_query(EventListQuery)

    def read(db: Db) -> tuple[bool, list[dict[str, Any]]]:
        # One more than the page: it only says whether more exist.
        rows = events.list_events(
            db, user_id, after=query.after, event_type=query.type, limit=query.limit + 1
        )
        page = [events.render_event(db, row) for row in rows[: query.limit]]
        return len(rows) > query.limit, page

    more, items = request_statements(read)
    headers = {}
    if more:
        args = {**request.args.to_dict(), "after": items[-1]["id"]}
        headers["Link"] = f'<{request.base_url}?{urlencode(args)}>; rel="next"'
    return json_response(items, headers=headers)
