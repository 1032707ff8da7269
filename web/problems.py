"""RFC 9457 problem responses for every error, and the handlers that produce them.

Nothing leaves the API as an HTML page or a stack trace: unknown routes, wrong
methods, oversized bodies, domain errors, database outages and bugs all become
application/problem+json with a stable `code`.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, json
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from common.db import is_outage, is_retryable
from common.errors import RemitError
from common.passwords import HashingBusy

log = logging.getLogger(__name__)

# code -> (HTTP status, title). docs/api.md's list of error codes, and nothing else.
PROBLEMS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "Invalid request"),
    "invalid_amount": (400, "Invalid amount"),
    "invalid_query": (400, "Invalid query"),
    "invalid_username": (400, "Invalid username"),
    "invalid_password": (400, "Invalid password"),
    "invalid_url": (400, "Invalid URL"),
    "same_account": (400, "Same account"),
    "currency_mismatch": (400, "Currency mismatch"),
    "unauthorized": (401, "Unauthorized"),
    "forbidden": (403, "Forbidden"),
    "insufficient_scope": (403, "Insufficient scope"),
    "not_found": (404, "Not found"),
    "user_not_found": (404, "User not found"),
    "account_not_found": (404, "Account not found"),
    "transfer_not_found": (404, "Transfer not found"),
    "currency_not_found": (404, "Currency not found"),
    "key_not_found": (404, "API key not found"),
    "webhook_not_found": (404, "Webhook not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "username_taken": (409, "Username taken"),
    "account_limit": (409, "Account limit reached"),
    "key_limit": (409, "API key limit reached"),
    "webhook_limit": (409, "Webhook limit reached"),
    "idempotency_key_in_use": (409, "Idempotency key in use"),
    # Refunds (docs/api.md "Refunds").
    "transfer_not_settled": (409, "Transfer not settled"),
    "not_refundable": (409, "Not refundable"),
    "refund_exceeds_transfer": (409, "Refund exceeds transfer"),
    "payload_too_large": (413, "Payload too large"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "idempotency_key_mismatch": (422, "Idempotency key mismatch"),
    "too_many_requests": (429, "Too many requests"),
    "internal_error": (500, "Internal error"),
    # Holds (docs/api.md "Holds").
    "hold_not_found": (404, "Hold not found"),
    "hold_not_active": (409, "Hold not active"),
    "service_unavailable": (503, "Service unavailable"),
}

_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "service_unavailable",
}

PROBLEM_TYPE_BASE = "https://remit.dev/problems/"


class ApiError(Exception):
    """An error raised by the web layer itself (auth, parsing)."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def problem_body(code: str, detail: str) -> dict[str, object]:
    status, title = PROBLEMS[code]
    return {
        "type": PROBLEM_TYPE_BASE + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }


# Every hashing slot taken (also answered before Flask: web.overload.RegistrationGate).
HASHING_BUSY = "too many password checks at once; try again in a moment"
HASHING_RETRY_AFTER_S = 1
# An address over its registration limit (REGISTRATIONS_PER_ADDRESS; web.users and
# web.overload.RegistrationGate).
REGISTRATIONS_LIMITED = "too many registrations from this address; try again later"


def problem(code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = problem_body(code, detail)
    response = Response(
        json.dumps(body),
        status=PROBLEMS[code][0],
        mimetype="application/problem+json",
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return problem(error.code, error.detail, error.headers)

    @app.errorhandler(RemitError)
    def _domain_error(error: RemitError) -> Response:
        return problem(error.code, error.detail)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _BY_STATUS.get(status, "invalid_request" if status < 500 else "internal_error")
        headers = {}
        if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        detail = error.description or PROBLEMS[code][1]
        return problem(code, detail, headers)

    @app.errorhandler(PoolTimeout)
    @app.errorhandler(DBAPIError)
    def _database_error(error: Exception) -> Response:
        # An outage, or a deadlock that survived its retries: the client may try again.
        if is_outage(error) or is_retryable(error):
            log.warning("database unavailable: %s", error)
            return problem(
                "service_unavailable",
                "the database is unavailable; try again",
                {"Retry-After": "1"},
            )
        log.exception("database error")
        return problem("internal_error", "an unexpected error occurred")

    @app.errorhandler(HashingBusy)
    def _hashing_busy(error: HashingBusy) -> Response:
        # Every hashing slot of this process is taken (docs/decisions/0038): a slot
        # frees in a fraction of a second, and waiting for one would hold a thread.
        return problem(
            "service_unavailable", HASHING_BUSY, {"Retry-After": str(HASHING_RETRY_AFTER_S)}
        )

    @app.errorhandler(Exception)
    def _bug(error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        return problem("internal_error", "an unexpected error occurred")
