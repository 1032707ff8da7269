from __future__ import annotations

from flask import Blueprint, Response

from common import accounts
from common.currencies import get_currency
from common.db import request_session, request_transaction
from common.transfers import submit_deposit
from web import overload
from web.auth import authenticated, authorize_path_user, current_user, require_superuser
from web.fields import (
    AccountQuery,
    DepositCreate,
    PageQuery,
    idempotency_key,
    parse_body,
    parse_query,
)
from web.render import (
    account_at_json,
    account_json,
    decode_cursor,
    json_response,
    page_response,
    posting_json,
)
from web.transfers import accept

bp = Blueprint("accounts", __name__)


@bp.get("/users/<id:user_id>/accounts")
@authenticated
def list_accounts(user_id: int) -> Response:
    authorize_path_user(user_id, write=False)
    with request_session() as session:
        rows = accounts.list_accounts(session, user_id)
        return json_response([account_json(session, account) for account in rows])


@bp.post("/users/<id:user_id>/accounts/<currency>")
@authenticated
def open_account(user_id: int, currency: str) -> Response:
    authorize_path_user(user_id, write=True)
    body = request_transaction(
        lambda session: account_json(session, accounts.open_account(session, user_id, currency))
    )
    return json_response(body, 201, {"Location": f"/accounts/{body['id']}"})


@bp.get("/accounts/<id:account_id>")
@authenticated
def get_account(account_id: int) -> Response:
    at = parse_query(AccountQuery).at
    with request_session() as session:
        account = accounts.get_visible_account(session, account_id, current_user().id)
        if at is None:
            return json_response(account_json(session, account))
        # Balance history (docs/api.md): read from the postings settlement wrote.
        balance = accounts.balance_at(session, account.id, at)
        return json_response(account_at_json(session, account, balance, at))


@bp.get("/accounts/<id:account_id>/postings")
@authenticated
def list_postings(account_id: int) -> Response:
    query = parse_query(PageQuery)
    after_id = decode_cursor(query.cursor, query.sort)
    with request_session() as session:
        account = accounts.get_visible_account(session, account_id, current_user().id)
        decimals = get_currency(session, account.currency).decimals
        rows = accounts.list_postings(
            session,
            account.id,
            descending=query.sort == "dsc",
            after_id=after_id,
            limit=query.limit + 1,
        )
        items = [posting_json(posting, decimals) for posting in rows]
    return page_response(items, rows, query.limit, query.sort)


@bp.post("/accounts/<id:account_id>/deposits")
@authenticated
def deposit(account_id: int) -> Response:
    require_superuser()
    fields = parse_body(DepositCreate)
    overload.check_account(account_id, None)
    key = idempotency_key()
    return accept(lambda db: submit_deposit(db, account_id, fields.amount, key))
