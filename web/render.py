"""Shaping responses: timestamps, money, resources and pages."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

from flask import Response, json, request
from sqlalchemy.orm import Session

from common.currencies import get_currency
from common.db import Db, request_session
from common.limits import BIGINT_MAX
from common.models import Account, Posting
from common.money import format_amount
from common.render import timestamp
from web.problems import ApiError


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _decimals(db: Db, currency: str) -> int:
    return get_currency(db, currency).decimals


def account_json(session: Session, account: Account) -> dict[str, Any]:
    decimals = _decimals(session, account.currency)
    return {
        "id": account.id,
        "user_id": account.user_id,
        "currency": account.currency,
        "kind": account.kind,
        "balance": format_amount(account.balance, decimals),
        # Reserved by holds, and what a payment may still spend (docs/api.md "Holds").
        "held": format_amount(account.held, decimals),
        "available": format_amount(account.balance - account.held, decimals),
        "created_at": timestamp(account.created_at),
    }


def account_at_json(
    session: Session, account: Account, balance: int, at: datetime
) -> dict[str, Any]:
    """The account as GET /accounts/{id}?at= shows it: its balance at `at`, and `as_of`."""
    body = account_json(session, account)
    body["balance"] = format_amount(balance, _decimals(session, account.currency))
    # What was held then is not recorded: only the balance has a history.
    del body["held"], body["available"]
    body["as_of"] = timestamp(at)
    return body


def posting_json(posting: Posting, decimals: int) -> dict[str, Any]:
    return {
        "id": posting.id,
        "transfer_id": posting.transfer_id,
        "amount": format_amount(posting.amount, decimals),
        "balance_after": format_amount(posting.balance_after, decimals),
        "created_at": timestamp(posting.created_at),
    }


# Cursors are opaque to clients: "<sort>:<last id>" in base64url, so a page can be
# continued only in the order it was started.
def encode_cursor(sort: str, last_id: int) -> str:
    return base64.urlsafe_b64encode(f"{sort}:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, sort: str) -> int | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        cursor_sort, last_id = raw.split(":", 1)
        # A larger id than BIGINT holds would fail in PostgreSQL, as a 500.
        if cursor_sort != sort or not last_id.isdigit() or int(last_id) > BIGINT_MAX:
            raise ValueError(raw)
        return int(last_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError("invalid_query", "cursor: not a cursor of this listing") from None


class _Listed(Protocol):
    @property
    def id(self) -> int: ...


class _Page(Protocol):
    @property
    def sort(self) -> str: ...
    @property
    def limit(self) -> int: ...
    @property
    def cursor(self) -> str | None: ...


Row = TypeVar("Row", bound=_Listed)


def listed_page(
    query: _Page,
    fetch: Callable[[Session, bool, int | None, int], Sequence[Row]],
    render: Callable[[Session, Row], dict[str, Any]],
) -> Response:
    """One page of a listing in id order: `fetch(session, descending, after_id, limit)`
    reads limit + 1 rows after the query's cursor, `render` shows each."""
    after_id = decode_cursor(query.cursor, query.sort)
    with request_session() as session:
        rows = fetch(session, query.sort == "dsc", after_id, query.limit + 1)
        items = [render(session, row) for row in rows]
    return page_response(items, rows, query.limit, query.sort)


def page_response(
    items: Sequence[dict[str, Any]], rows: Sequence[_Listed], limit: int, sort: str
) -> Response:
    """A JSON list of one page; a Link header to the next page when there is one.

    `rows` were fetched with limit + 1: the extra row only says that more exist.
    """
    headers = {}
    if len(rows) > limit:
        args = request.args.to_dict()
        args["cursor"] = encode_cursor(sort, rows[limit - 1].id)
        headers["Link"] = f'<{request.base_url}?{urlencode(args)}>; rel="next"'
    return json_response(list(items[:limit]), headers=headers)
