"""/users/{user_id}/api-keys: create (the secret shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, Response
from pydantic import BeforeValidator, Field, WithJsonSchema

from common import api_keys
from common.db import request_session, request_transaction
from common.models import ApiKey
from common.render import timestamp
from web.auth import authenticated, authorize_own_path, authorize_path_user, password_auth
from web.fields import Schema, Text, parse_body
from web.render import json_response

bp = Blueprint("api_keys", __name__)


def _scopes(value: object) -> tuple[str, ...]:
    """A JSON list of scopes, or one comma-separated string (a form field)."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of scopes or a comma-separated string")
    chosen = {scope.strip() for scope in value}
    if not chosen or not chosen <= set(api_keys.ALL_SCOPES):
        raise ValueError(f"must be a non-empty subset of {', '.join(api_keys.ALL_SCOPES)}")
    return tuple(scope for scope in api_keys.ALL_SCOPES if scope in chosen)


SCOPES_SCHEMA = {
    "description": "A list of scopes, or a comma-separated string of them (form fields).",
    "anyOf": [
        {
            "type": "array",
            "items": {"enum": list(api_keys.ALL_SCOPES)},
            "minItems": 1,
            "uniqueItems": True,
        },
        {"type": "string", "examples": ["read,transfers"]},
    ],
    "default": list(api_keys.ALL_SCOPES),
}


class ApiKeyCreate(Schema):
    name: Text = Field(min_length=1, max_length=api_keys.NAME_MAX_LENGTH)
    scopes: Annotated[tuple[str, ...], BeforeValidator(_scopes), WithJsonSchema(SCOPES_SCHEMA)] = (
        api_keys.ALL_SCOPES
    )


def key_json(key: ApiKey) -> dict[str, Any]:
    """A key as clients see it: never its secret (nor its digest)."""
    return {
        "id": key.id,
        "name": key.name,
        "scopes": [scope for scope in api_keys.ALL_SCOPES if scope in key.scopes],
        "prefix": key.prefix,
        "created_at": timestamp(key.created_at),
        "last_used_at": timestamp(key.last_used_at),
    }


@bp.post("/users/<id:user_id>/api-keys")
@password_auth
def create(user_id: int) -> Response:
    authorize_own_path(user_id)
    fields = parse_body(ApiKeyCreate)

    def created(session: Any) -> dict[str, Any]:
        key, secret = api_keys.create_key(session, user_id, fields.name, fields.scopes)
        return {**key_json(key), "secret": secret}

    body = request_transaction(created)
    # The secret in this response only: no cache may keep it.
    return json_response(body, 201, {"Location": f"/users/{user_id}/api-keys/{body['id']}"})


@bp.get("/users/<id:user_id>/api-keys")
@authenticated
def list_(user_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    with request_session() as session:
        return json_response([key_json(key) for key in api_keys.list_keys(session, user_id)])


@bp.get("/users/<id:user_id>/api-keys/<id:key_id>")
@authenticated
def read(user_id: int, key_id: int) -> Response:
    """What a creation's Location names (never the secret)."""
    authorize_path_user(user_id, write=False)
    with request_session() as session:
        return json_response(key_json(api_keys.get_key(session, user_id, key_id)))


@bp.delete("/users/<id:user_id>/api-keys/<id:key_id>")
@password_auth
def revoke(user_id: int, key_id: int) -> Response:
    authorize_own_path(user_id)
    digest = request_transaction(lambda session: api_keys.revoke_key(session, user_id, key_id))
    api_keys.announce_revoked(digest)
    return Response(status=204)
