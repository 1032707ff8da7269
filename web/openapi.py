"""The OpenAPI 3.1 document, built from the pydantic schemas that validate requests.

Request bodies and queries come straight from web.fields (one source of truth);
responses are described by the models below. apispec assembles the document;
/docs serves Swagger UI from files shipped in the flask-swagger-ui package, so
the page fetches nothing from the internet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from apispec import APISpec
from flask import Blueprint, Flask, Response
from flask_swagger_ui import get_swaggerui_blueprint
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from common.limits import IDEMPOTENCY_KEY_MAX_LENGTH
from web import api_keys, fields
from web.problems import PROBLEMS
from web.render import json_response

Money = Field(description='Decimal string in major units, e.g. "10.50"', examples=["10.50"])
Timestamp = Field(description="RFC 3339, UTC", examples=["2026-11-27T10:15:30.123456Z"])


class Currency(BaseModel):
    code: str = Field(examples=["USD"])
    name: str
    decimals: int
    commission_rate: str = Field(examples=["0.01"])


class User(BaseModel):
    id: int
    username: str
    full_name: str
    created_at: str = Timestamp


def _only_a_string(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    schema.pop("anyOf", None)
    schema["type"] = "string"


class Account(BaseModel):
    id: int
    user_id: int
    currency: str
    kind: Literal["user", "commission", "external"]
    balance: str = Money
    # Absent with ?at= (never null): not required, and no "default": null.
    held: str | None = Field(
        None,
        description="Reserved by active holds (not with ?at=)",
        examples=["0.00"],
        json_schema_extra=_only_a_string,
    )
    available: str | None = Field(
        None,
        description="balance - held: what a payment may still spend (not with ?at=)",
        examples=["10.50"],
        json_schema_extra=_only_a_string,
    )
    created_at: str = Timestamp
    # Present only with ?at= (never null): not required, and no "default": null.
    as_of: str | None = Field(
        None,
        description="With ?at= only: the instant the balance is for (RFC 3339, UTC)",
        examples=["2026-11-27T10:15:30.000000Z"],
        json_schema_extra=_only_a_string,
    )


class Transfer(BaseModel):
    id: int
    status: Literal["pending", "settled", "rejected", "failed"]
    from_: int = Field(alias="from")
    to: int
    from_user_id: int
    to_user_id: int
    currency: str
    amount: str = Money
    commission: str = Money
    comment: str
    reason: str | None = Field(examples=[None, "insufficient_funds"])
    created_at: str = Timestamp
    settled_at: str | None = Timestamp
    kind: Literal["transfer", "deposit", "refund", "payout", "capture"]
    refund_of: int | None = Field(description="A refund's original transfer")
    refunded: str = Field(
        description="The sum of its settled refunds, in the currency's decimals",
        examples=["0.00"],
    )
    hold_id: int | None = Field(description="A capture's hold")
    destination: str | None = Field(description="A payout's destination outside Remit")


class Hold(BaseModel):
    id: int
    status: Literal["pending", "held", "rejected", "captured", "voided", "expired"]
    from_: int = Field(alias="from")
    to: int
    from_user_id: int
    to_user_id: int
    currency: str
    amount: str = Money
    commission: str = Money
    captured_amount: str | None = Field(description="Once captured: how much", examples=[None])
    transfer_id: int | None = Field(description="The capture transfer, once asked for")
    reason: str | None = Field(examples=[None, "insufficient_funds"])
    comment: str
    created_at: str = Timestamp
    expires_at: str = Timestamp
    updated_at: str = Timestamp


class Event(BaseModel):
    id: str = Field(description="Event ids are strings; order by the feed, not by id")
    type: Literal[
        "transfer.settled",
        "transfer.rejected",
        "transfer.failed",
        "transfer.received",
        "hold.held",
        "hold.rejected",
        "hold.captured",
        "hold.voided",
        "hold.expired",
    ]
    created_at: str = Timestamp
    data: Transfer | Hold = Field(
        description="The transfer (transfer.*) or the hold (hold.*) as it was when the "
        "event happened"
    )


class Posting(BaseModel):
    id: int
    transfer_id: int
    amount: str = Field(examples=["-10.10"])
    balance_after: str = Money
    created_at: str = Timestamp


class ApiKey(BaseModel):
    id: int
    name: str
    scopes: list[Literal["read", "transfers"]]
    prefix: str = Field(description="The secret's first 12 characters", examples=["rk_Xy3kP0aQ2"])
    created_at: str = Timestamp
    last_used_at: str | None = Field(
        description="RFC 3339, UTC; updated at most once a minute", examples=[None]
    )


class ApiKeyCreated(ApiKey):
    secret: str = Field(
        description="Authorization: Bearer <secret>. In this response only.",
        examples=["rk_Xy3kP0aQ2m9vT7cW1nB5dR8fH4jL6sZ0uE2gK9pA1qM"],
    )


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str = Field(examples=sorted(PROBLEMS))


class BatchResult(BaseModel):
    status: int
    transfer: Transfer | None = None
    error: Problem | None = None


class BatchResponse(BaseModel):
    results: list[BatchResult]


class Webhook(BaseModel):
    id: int
    url: str
    events: list[str] = Field(examples=[["*"], ["transfer.settled", "transfer.received"]])
    enabled: bool
    created_at: str = Timestamp


class WebhookCreated(Webhook):
    secret: str = Field(
        description="whsec_ + base64 of 32 random bytes; in this answer only",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw1ks4k2/8ouw="],
    )


class DeliveryAttempt(BaseModel):
    event_id: str
    attempt: int
    status_code: int | None
    error: str | None
    at: str = Timestamp
    next_attempt_at: str | None = Timestamp
    state: Literal["delivered", "retrying", "failed"]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"]
    broker: Literal["ok", "unavailable"]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    status: int
    response: type[BaseModel] | None
    many: bool = False
    auth: bool = True
    # HTTP Basic only: an API key is refused (key and webhook management).
    password_only: bool = False
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[str, ...] = ()
    json_only: bool = False
    idempotent: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # A success body that is not JSON (its media type), for /metrics.
    media_type: str = "application/json"
    # Error statuses answered with a JSON body of their own instead of a problem.
    json_errors: dict[int, type[BaseModel]] = field(default_factory=dict)
    # OpenAPI links from the success response: name -> (target "METHOD /path", values).
    links: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)


_AUTH = ("unauthorized", "too_many_requests", "insufficient_scope")
_BODY = ("invalid_request", "unsupported_media_type", "payload_too_large")

OPERATIONS = (
    Operation("get", "/currencies", "List currencies", 200, Currency, many=True, auth=False),
    Operation(
        "post",
        "/users",
        "Register a user (opens one account per currency)",
        201,
        User,
        auth=False,
        body=fields.UserCreate,
        # too_many_requests: registrations per address (docs/api.md "Overload").
        errors=(
            *_BODY,
            "invalid_username",
            "invalid_password",
            "username_taken",
            "too_many_requests",
        ),
        headers={"Location": "/users/{id}"},
        links={
            "accounts": ("GET /users/{user_id}/accounts", {"user_id": "$response.body#/id"}),
            "open_account": (
                "POST /users/{user_id}/accounts/{currency}",
                {"user_id": "$response.body#/id"},
            ),
            "transfers": ("GET /users/{user_id}/transfers", {"user_id": "$response.body#/id"}),
        },
    ),
    Operation(
        "get",
        "/users/{user_id}/accounts",
        "List a user's accounts",
        200,
        Account,
        many=True,
        errors=(*_AUTH, "forbidden", "user_not_found"),
        links={
            "account": ("GET /accounts/{account_id}", {"account_id": "$response.body#/0/id"}),
            "statement": (
                "GET /accounts/{account_id}/postings",
                {"account_id": "$response.body#/0/id"},
            ),
            "deposit": (
                "POST /accounts/{account_id}/deposits",
                {"account_id": "$response.body#/0/id"},
            ),
            "pay_from_first_account": (
                "POST /users/{user_id}/transfers",
                {"user_id": "$request.path.user_id", "$body": {"from": "$response.body#/0/id"}},
            ),
        },
    ),
    Operation(
        "post",
        "/users/{user_id}/accounts/{currency}",
        "Open another account",
        201,
        Account,
        errors=(*_AUTH, "forbidden", "currency_not_found", "account_limit"),
        headers={"Location": "/accounts/{id}"},
        links={
            "account": ("GET /accounts/{account_id}", {"account_id": "$response.body#/id"}),
            "deposit": (
                "POST /accounts/{account_id}/deposits",
                {"account_id": "$response.body#/id"},
            ),
        },
    ),
    Operation(
        "get",
        "/accounts/{account_id}",
        "Read an account, or its balance at an instant (?at=)",
        200,
        Account,
        query=fields.AccountQuery,
        errors=(*_AUTH, "account_not_found", "invalid_query"),
    ),
    Operation(
        "get",
        "/accounts/{account_id}/postings",
        "Account statement",
        200,
        Posting,
        many=True,
        query=fields.PageQuery,
        errors=(*_AUTH, "account_not_found", "invalid_query"),
        headers={"Link": "next page"},
    ),
    Operation(
        "post",
        "/accounts/{account_id}/deposits",
        "Deposit (superuser only)",
        202,
        Transfer,
        body=fields.DepositCreate,
        errors=(
            *_AUTH,
            *_BODY,
            "forbidden",
            "account_not_found",
            "invalid_amount",
            "same_account",
            "idempotency_key_mismatch",
            "idempotency_key_in_use",
        ),
        headers={"Location": "/users/{user_id}/transfers/{id}"},
        idempotent=True,
        links={
            "transfer": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {"user_id": "$response.body#/from_user_id", "transfer_id": "$response.body#/id"},
            ),
        },
    ),
    Operation(
        "post",
        "/users/{user_id}/transfers",
        "Submit a transfer (settled asynchronously)",
        202,
        Transfer,
        body=fields.TransferCreate,
        errors=(
            *_AUTH,
            *_BODY,
            "forbidden",
            "invalid_amount",
            "account_not_found",
            "same_account",
            "currency_mismatch",
            "idempotency_key_mismatch",
            "idempotency_key_in_use",
        ),
        headers={"Location": "/users/{user_id}/transfers/{id}"},
        idempotent=True,
        links={
            "transfer": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {"user_id": "$request.path.user_id", "transfer_id": "$response.body#/id"},
            ),
            "statement": (
                "GET /accounts/{account_id}/postings",
                {"account_id": "$response.body#/from"},
            ),
        },
    ),
    Operation(
        "post",
        "/users/{user_id}/transfers/batch",
        f"Submit up to {fields.MAX_BATCH_ITEMS} transfers",
        202,
        BatchResponse,
        body=fields.BatchCreate,
        json_only=True,
        errors=(*_AUTH, *_BODY, "forbidden"),
        links={
            "transfer": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {
                    "user_id": "$request.path.user_id",
                    "transfer_id": "$response.body#/results/0/transfer/id",
                },
            ),
        },
    ),
    Operation(
        "get",
        "/users/{user_id}/transfers",
        "List transfers",
        200,
        Transfer,
        many=True,
        query=fields.TransferListQuery,
        errors=(*_AUTH, "forbidden", "user_not_found", "invalid_query"),
        headers={"Link": "next page"},
        links={
            "transfer": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {"user_id": "$request.path.user_id", "transfer_id": "$response.body#/0/id"},
            ),
        },
    ),
    Operation(
        "get",
        "/users/{user_id}/transfers/{transfer_id}",
        "Read (or long-poll) a transfer",
        200,
        Transfer,
        query=fields.TransferWaitQuery,
        errors=(*_AUTH, "forbidden", "user_not_found", "transfer_not_found", "invalid_query"),
    ),
    # Refunds and payouts (docs/api.md "Refunds", "Payouts").
    Operation(
        "post",
        "/users/{user_id}/transfers/{transfer_id}/refunds",
        "Refund (part of) a settled transfer the user received (settled asynchronously)",
        202,
        Transfer,
        body=fields.RefundCreate,
        errors=(
            *_AUTH,
            *_BODY,
            "forbidden",
            "transfer_not_found",
            "not_refundable",
            "transfer_not_settled",
            "invalid_amount",
            "refund_exceeds_transfer",
            "idempotency_key_mismatch",
            "idempotency_key_in_use",
        ),
        headers={"Location": "/users/{user_id}/transfers/{id}"},
        idempotent=True,
        links={
            "transfer": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {"user_id": "$request.path.user_id", "transfer_id": "$response.body#/id"},
            ),
            "original": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {"user_id": "$request.path.user_id", "transfer_id": "$response.body#/refund_of"},
            ),
        },
    ),
    Operation(
        "post",
        "/users/{user_id}/payouts",
        "Pay money out to the currency's external account (settled asynchronously)",
        202,
        Transfer,
        body=fields.PayoutCreate,
        errors=(
            *_AUTH,
            *_BODY,
            "forbidden",
            "invalid_amount",
            "account_not_found",
            "idempotency_key_mismatch",
            "idempotency_key_in_use",
        ),
        headers={"Location": "/users/{user_id}/transfers/{id}"},
        idempotent=True,
        links={
            "transfer": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {"user_id": "$request.path.user_id", "transfer_id": "$response.body#/id"},
            ),
        },
    ),
    Operation(
        "post",
        "/users/{user_id}/api-keys",
        "Create an API key (password auth; the secret is shown once)",
        201,
        ApiKeyCreated,
        password_only=True,
        body=api_keys.ApiKeyCreate,
        errors=("unauthorized", "too_many_requests", *_BODY, "forbidden", "key_limit"),
        headers={"Location": "/users/{user_id}/api-keys/{id}"},
    ),
    Operation(
        "get",
        "/users/{user_id}/api-keys",
        "List a user's API keys, newest first (never their secrets)",
        200,
        ApiKey,
        many=True,
        errors=(*_AUTH, "forbidden", "user_not_found"),
    ),
    Operation(
        "get",
        "/users/{user_id}/api-keys/{key_id}",
        "Read one API key (never its secret)",
        200,
        ApiKey,
        errors=(*_AUTH, "forbidden", "user_not_found", "key_not_found"),
    ),
    Operation(
        "delete",
        "/users/{user_id}/api-keys/{key_id}",
        "Revoke an API key (password auth)",
        204,
        None,
        password_only=True,
        errors=("unauthorized", "too_many_requests", "forbidden", "key_not_found"),
    ),
    Operation(
        "get",
        "/users/{user_id}/events",
        "The event feed: a user's events in commit order",
        200,
        Event,
        many=True,
        query=fields.EventListQuery,
        errors=(*_AUTH, "forbidden", "user_not_found", "invalid_query"),
        headers={"Link": "next page"},
    ),
    Operation(
        "post",
        "/users/{user_id}/webhooks",
        "Register a webhook (password auth; the secret is shown once)",
        201,
        WebhookCreated,
        password_only=True,
        body=fields.WebhookCreate,
        errors=(*_AUTH, *_BODY, "forbidden", "invalid_url", "webhook_limit"),
        headers={"Location": "/users/{user_id}/webhooks/{id}"},
        links={
            "deliveries": (
                "GET /users/{user_id}/webhooks/{webhook_id}/deliveries",
                {"user_id": "$request.path.user_id", "webhook_id": "$response.body#/id"},
            ),
            "delete": (
                "DELETE /users/{user_id}/webhooks/{webhook_id}",
                {"user_id": "$request.path.user_id", "webhook_id": "$response.body#/id"},
            ),
        },
    ),
    Operation(
        "get",
        "/users/{user_id}/webhooks",
        "List a user's webhooks (password auth)",
        200,
        Webhook,
        password_only=True,
        many=True,
        errors=(*_AUTH, "forbidden", "user_not_found"),
    ),
    Operation(
        "get",
        "/users/{user_id}/webhooks/{webhook_id}",
        "Read one webhook (password auth; never its secret)",
        200,
        Webhook,
        password_only=True,
        errors=(*_AUTH, "forbidden", "user_not_found", "webhook_not_found"),
    ),
    Operation(
        "delete",
        "/users/{user_id}/webhooks/{webhook_id}",
        "Delete a webhook (password auth)",
        204,
        None,
        password_only=True,
        errors=(*_AUTH, "forbidden", "webhook_not_found"),
    ),
    Operation(
        "get",
        "/users/{user_id}/webhooks/{webhook_id}/deliveries",
        "A webhook's delivery attempts, newest first (password auth)",
        200,
        DeliveryAttempt,
        password_only=True,
        many=True,
        query=fields.DeliveryListQuery,
        errors=(*_AUTH, "forbidden", "user_not_found", "webhook_not_found", "invalid_query"),
        headers={"Link": "next page"},
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics (text exposition format)",
        200,
        None,
        auth=False,
        media_type="text/plain",
    ),
    Operation(
        "get",
        "/health",
        "Health of the API and its dependencies",
        200,
        Health,
        auth=False,
        # A failing dependency is named in a Health body, not in a problem.
        json_errors={503: Health},
    ),
    # --- Holds (docs/api.md "Holds") ---
    Operation(
        "post",
        "/users/{user_id}/holds",
        "Place a hold (reserved asynchronously)",
        202,
        Hold,
        body=fields.HoldCreate,
        errors=(
            *_AUTH,
            *_BODY,
            "forbidden",
            "invalid_amount",
            "account_not_found",
            "same_account",
            "currency_mismatch",
            "idempotency_key_mismatch",
            "idempotency_key_in_use",
        ),
        headers={"Location": "/users/{user_id}/holds/{id}"},
        idempotent=True,
        links={
            "hold": (
                "GET /users/{user_id}/holds/{hold_id}",
                {"user_id": "$request.path.user_id", "hold_id": "$response.body#/id"},
            ),
            "capture": (
                "POST /users/{user_id}/holds/{hold_id}/capture",
                {"user_id": "$request.path.user_id", "hold_id": "$response.body#/id"},
            ),
            "void": (
                "POST /users/{user_id}/holds/{hold_id}/void",
                {"user_id": "$request.path.user_id", "hold_id": "$response.body#/id"},
            ),
        },
    ),
    Operation(
        "get",
        "/users/{user_id}/holds",
        "List holds (made or received)",
        200,
        Hold,
        many=True,
        query=fields.HoldListQuery,
        errors=(*_AUTH, "forbidden", "user_not_found", "invalid_query"),
        headers={"Link": "next page"},
    ),
    Operation(
        "get",
        "/users/{user_id}/holds/{hold_id}",
        "Read (or long-poll) a hold",
        200,
        Hold,
        query=fields.TransferWaitQuery,
        errors=(*_AUTH, "forbidden", "user_not_found", "hold_not_found", "invalid_query"),
    ),
    Operation(
        "post",
        "/users/{user_id}/holds/{hold_id}/capture",
        "Capture a held hold, all or part (by its maker)",
        202,
        Hold,
        body=fields.HoldCapture,
        errors=(
            *_AUTH,
            *_BODY,
            "forbidden",
            "invalid_amount",
            "hold_not_found",
            "hold_not_active",
            "idempotency_key_mismatch",
            "idempotency_key_in_use",
        ),
        idempotent=True,
        links={
            "capture_transfer": (
                "GET /users/{user_id}/transfers/{transfer_id}",
                {"user_id": "$request.path.user_id", "transfer_id": "$response.body#/transfer_id"},
            ),
        },
    ),
    Operation(
        "post",
        "/users/{user_id}/holds/{hold_id}/void",
        "Void a hold (by its maker or its payee)",
        202,
        Hold,
        errors=(*_AUTH, "forbidden", "hold_not_found", "hold_not_active"),
    ),
)

# Every response may also be one of these.
_ALWAYS = ("not_found", "method_not_allowed", "service_unavailable")

_PATH_PARAMETERS = {
    "user_id": {"type": "integer", "minimum": 0},
    "account_id": {"type": "integer", "minimum": 0},
    "transfer_id": {"type": "integer", "minimum": 0},
    "key_id": {"type": "integer", "minimum": 0},
    "webhook_id": {"type": "integer", "minimum": 0},
    "hold_id": {"type": "integer", "minimum": 0},
    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
}


def _schemas() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        Currency,
        User,
        Account,
        Transfer,
        Event,
        Hold,
        Posting,
        Problem,
        BatchResponse,
        Health,
        ApiKey,
        ApiKeyCreated,
        api_keys.ApiKeyCreate,
        Webhook,
        WebhookCreated,
        DeliveryAttempt,
        fields.UserCreate,
        fields.TransferCreate,
        fields.DepositCreate,
        fields.BatchItem,
        fields.BatchCreate,
        fields.WebhookCreate,
        fields.HoldCreate,
        fields.HoldCapture,
        fields.RefundCreate,
        fields.PayoutCreate,
    ]
    _, top = models_json_schema(
        [(model, "validation") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top["$defs"]
    # The batch route validates its items one by one (so that one bad item fails alone),
    # hence no item schema in BatchCreate itself; each item is a BatchItem.
    schemas["BatchCreate"]["properties"]["transfers"]["items"] = _ref(fields.BatchItem)
    return schemas


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True)
    return [
        {"name": name, "in": "query", "required": False, "schema": _without_null(prop)}
        for name, prop in schema["properties"].items()
    ]


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter is absent, never null: drop pydantic's null branch."""
    branches = [b for b in prop.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) != 1:
        return prop
    rest = {key: value for key, value in prop.items() if key not in ("anyOf", "default")}
    return {**branches[0], **rest}


def operation_id(method: str, path: str) -> str:
    return f"{method}_{path}".replace("/", "_").replace("{", "").replace("}", "")


def _links(op: Operation) -> dict[str, Any]:
    """OpenAPI links: how a response's ids feed the next requests (stateful clients, fuzzers)."""
    links = {}
    for name, (target, values) in op.links.items():
        method, path = target.split(" ", 1)
        link: dict[str, Any] = {"operationId": operation_id(method.lower(), path)}
        parameters = {key: value for key, value in values.items() if key != "$body"}
        if parameters:
            link["parameters"] = parameters
        if "$body" in values:
            link["requestBody"] = values["$body"]
        links[name] = link
    return links


def _security(op: Operation) -> list[dict[str, list[str]]]:
    if not op.auth:
        return []
    if op.password_only:
        return [{"basic": []}]
    return [{"basic": []}, {"bearer": []}]


def _operation(op: Operation) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": _PATH_PARAMETERS[name]}
        for name in _PATH_PARAMETERS
        if "{" + name + "}" in op.path
    ]
    if op.query:
        params += _query_parameters(op.query)
    if op.idempotent:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": IDEMPOTENCY_KEY_MAX_LENGTH,
                },
            }
        )
    body_schema = (
        ({"type": "array", "items": _ref(op.response)} if op.many else _ref(op.response))
        if op.response
        else None
    )
    success: dict[str, Any] = {"description": op.summary}
    if body_schema:
        success["content"] = {op.media_type: {"schema": body_schema}}
    elif op.media_type != "application/json":
        success["content"] = {op.media_type: {"schema": {"type": "string"}}}
    if op.headers:
        success["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in op.headers.items()
        }
    if op.links:
        success["links"] = _links(op)
    responses: dict[str, Any] = {str(op.status): success}
    by_status: dict[int, list[str]] = {}
    for code in (*op.errors, *_ALWAYS):
        by_status.setdefault(PROBLEMS[code][0], []).append(code)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {
            "description": "Problem: " + ", ".join(sorted(set(codes))),
            "content": {"application/problem+json": {"schema": _ref(Problem)}},
        }
    for status, model in op.json_errors.items():
        responses[str(status)] = {
            "description": model.__name__,
            "content": {"application/json": {"schema": _ref(model)}},
        }
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": operation_id(op.method, op.path),
        "parameters": params,
        "responses": responses,
        "security": _security(op),
    }
    if op.body:
        media = ["application/json"]
        if not op.json_only:
            media += ["application/x-www-form-urlencoded", "multipart/form-data"]
        operation["requestBody"] = {
            "required": True,
            "content": {m: {"schema": _ref(op.body)} for m in media},
        }
    return operation


@cache
def document() -> dict[str, Any]:
    spec = APISpec(
        title="Remit",
        version="1.0.0",
        openapi_version="3.1.0",
        info={
            "description": "Asynchronous money transfers. The full contract, in words: "
            "docs/api.md in the repository."
        },
    )
    spec.components.security_scheme("basic", {"type": "http", "scheme": "basic"})
    spec.components.security_scheme(
        "bearer",
        {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (rk_...): GET needs its `read` scope, "
            "every other method `transfers`",
        },
    )
    for name, schema in _schemas().items():
        spec.components.schema(name, schema)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return json_response(document())


def install_docs(app: Flask) -> None:
    app.register_blueprint(bp)
    app.register_blueprint(
        get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "Remit API"}),
        url_prefix="/docs",
    )
