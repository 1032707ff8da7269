"""Webhooks: register, list and delete a user's endpoints, and read their delivery attempts.

Password auth only (a key cannot manage webhooks). The secret is shown once, in the
creation's answer; deliveries themselves are the delivery worker's (worker.webhooks).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response
from sqlalchemy.orm import Session

from common import webhooks
from common.db import request_session, request_transaction
from common.models import Webhook, WebhookAttempt
from common.render import timestamp
from web.auth import authorize_own_path, authorize_path_user, password_auth
from web.context import current_settings
from web.fields import DeliveryListQuery, WebhookCreate, parse_body, parse_query
from web.render import decode_cursor, json_response, page_response

bp = Blueprint("webhooks", __name__)

# The deliveries listing is newest first only; its cursors say so.
_NEWEST_FIRST = "dsc"


def webhook_json(webhook: Webhook) -> dict[str, Any]:
    return {
        "id": webhook.id,
        "url": webhook.url,
        "events": list(webhook.events),
        "enabled": webhook.enabled,
        "created_at": timestamp(webhook.created_at),
    }


def attempt_json(attempt: WebhookAttempt) -> dict[str, Any]:
    return {
        "event_id": str(attempt.event_id),
        "attempt": attempt.attempt,
        "status_code": attempt.status_code,
        "error": attempt.error,
        "at": timestamp(attempt.at),
        "next_attempt_at": timestamp(attempt.next_attempt_at),
        "state": attempt.state,
    }


@bp.post("/users/<id:user_id>/webhooks")
@password_auth
def create(user_id: int) -> Response:
    authorize_own_path(user_id)
    fields = parse_body(WebhookCreate)
    # Checked before the transaction: the name lookup must not hold the owner's row lock.
    url = webhooks.check_url(fields.url, allow_loopback=not current_settings().is_production)

    def created(session: Session) -> dict[str, Any]:
        webhook = webhooks.create_webhook(session, user_id, url, fields.events)
        # The only answer that ever shows the secret.
        return {**webhook_json(webhook), "secret": webhook.secret}

    body = request_transaction(created)
    location = f"/users/{user_id}/webhooks/{body['id']}"
    return json_response(_ordered(body), 201, {"Location": location})


def _ordered(body: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "url", "events", "secret", "enabled", "created_at")
    return {key: body[key] for key in keys}


@bp.get("/users/<id:user_id>/webhooks")
@password_auth
def list_(user_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    with request_session() as session:
        rows = webhooks.list_webhooks(session, user_id)
        return json_response([webhook_json(webhook) for webhook in rows])


@bp.get("/users/<id:user_id>/webhooks/<id:webhook_id>")
@password_auth
def read(user_id: int, webhook_id: int) -> Response:
    """What a creation's Location names (never the secret)."""
    authorize_path_user(user_id, write=False)
    with request_session() as session:
        return json_response(webhook_json(webhooks.get_webhook(session, user_id, webhook_id)))


@bp.delete("/users/<id:user_id>/webhooks/<id:webhook_id>")
@password_auth
def delete(user_id: int, webhook_id: int) -> Response:
    authorize_own_path(user_id)
    request_transaction(lambda session: webhooks.delete_webhook(session, user_id, webhook_id))
    return Response(status=204)


@bp.get("/users/<id:user_id>/webhooks/<id:webhook_id>/deliveries")
@password_auth
def deliveries(user_id: int, webhook_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    query = parse_query(DeliveryListQuery)
    after_id = decode_cursor(query.cursor, _NEWEST_FIRST)
    with request_session() as session:
        webhook = webhooks.get_webhook(session, user_id, webhook_id)
        rows = webhooks.list_attempts(session, webhook.id, after_id=after_id, limit=query.limit + 1)
        items = [attempt_json(attempt) for attempt in rows]
    return page_response(items, rows, query.limit, _NEWEST_FIRST)
