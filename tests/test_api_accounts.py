"""docs/api.md: GET /accounts/{id}, POST /users/{id}/accounts/{currency},
GET /accounts/{id}/postings and POST /accounts/{id}/deposits."""

from __future__ import annotations

import base64
import re

import pytest

from common.accounts import MAX_ACCOUNTS_PER_USER
from tests.conftest import SUPERUSER, assert_problem, next_page, read_all_pages

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
# held and available: docs/api.md "Holds".
ACCOUNT_FIELDS = {"id", "user_id", "currency", "kind", "balance", "held", "available", "created_at"}
POSTING_FIELDS = {"id", "transfer_id", "amount", "balance_after", "created_at"}
MISSING_ID = 2**62


def superuser_account(client, currency: str, kind: str) -> int:
    accounts = client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    [account] = [a for a in accounts if a["currency"] == currency and a["kind"] == kind]
    return account["id"]


# --- GET /accounts/{id} --------------------------------------------------------------------


def test_owner_reads_an_account(api) -> None:
    member = api.register()
    account_id = member.accounts["CNY"]
    response = api.client.get(f"/accounts/{account_id}", headers=member.auth)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == ACCOUNT_FIELDS
    assert body["id"] == account_id
    assert body["user_id"] == member.id
    assert body["currency"] == "CNY"
    assert body["kind"] == "user"
    assert body["balance"] == "0.00"
    assert RFC3339_UTC.match(body["created_at"])


def test_account_that_does_not_exist(api) -> None:
    member = api.register()
    response = api.client.get(f"/accounts/{MISSING_ID}", headers=member.auth)
    assert_problem(response, 404, "account_not_found")


def test_superuser_reads_any_account(api) -> None:
    member = api.funded("12.34", "EUR")
    response = api.client.get(f"/accounts/{member.accounts['EUR']}", headers=SUPERUSER.auth)
    assert response.status_code == 200
    assert response.get_json()["balance"] == "12.34"
    assert response.get_json()["user_id"] == member.id


# --- POST /users/{id}/accounts/{currency} --------------------------------------------------


@pytest.mark.parametrize("currency", ["USD", "CNY", "EUR"])
def test_open_another_account(api, currency: str) -> None:
    member = api.register()
    response = api.client.post(f"/users/{member.id}/accounts/{currency}", headers=member.auth)

    assert response.status_code == 201, response.get_json()
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == ACCOUNT_FIELDS
    assert body["user_id"] == member.id
    assert body["currency"] == currency
    assert body["kind"] == "user"
    assert body["balance"] == "0.00"
    assert body["id"] not in member.accounts.values()
    assert response.headers["Location"] == f"/accounts/{body['id']}"
    again = api.client.get(response.headers["Location"], headers=member.auth)
    assert again.status_code == 200
    assert again.get_json() == body


@pytest.mark.parametrize("currency", ["XYZ", "usd", "US", "USDD", "U$D", "A" * 300])
def test_open_account_in_unknown_currency(api, currency: str) -> None:
    member = api.register()
    response = api.client.post(f"/users/{member.id}/accounts/{currency}", headers=member.auth)
    assert_problem(response, 404, "currency_not_found")


def test_a_user_holds_at_most_50_accounts(api) -> None:
    assert MAX_ACCOUNTS_PER_USER == 50
    member = api.register()
    path = f"/users/{member.id}/accounts"
    for _ in range(50 - len(member.accounts)):
        assert api.client.post(f"{path}/USD", headers=member.auth).status_code == 201
    assert_problem(api.client.post(f"{path}/EUR", headers=member.auth), 409, "account_limit")
    accounts = api.client.get(path, headers=member.auth).get_json()
    assert len(accounts) == 50


# --- POST /accounts/{id}/deposits ----------------------------------------------------------


def test_superuser_deposit_is_accepted_then_settled(api) -> None:
    member = api.register()
    account_id = member.accounts["USD"]
    external = superuser_account(api.client, "USD", "external")
    response = api.client.post(
        f"/accounts/{account_id}/deposits", data={"amount": "25.5"}, headers=SUPERUSER.auth
    )

    assert response.status_code == 202, response.get_json()
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["status"] == "pending"
    assert body["from"] == external
    assert body["to"] == account_id
    assert body["from_user_id"] == 1
    assert body["to_user_id"] == member.id
    assert body["currency"] == "USD"
    assert body["amount"] == "25.50"
    assert body["commission"] == "0.00"
    assert body["reason"] is None
    assert body["settled_at"] is None
    assert response.headers["Location"] == f"/users/1/transfers/{body['id']}"

    final = api.wait_final(SUPERUSER, body["id"])
    assert final["status"] == "settled"
    assert RFC3339_UTC.match(final["settled_at"])
    assert api.balance(member, account_id) == "25.50"
    # The payee sees the deposit among its own transfers too.
    assert api.get_transfer(member, body["id"])["status"] == "settled"


def test_deposit_accepts_a_json_number(api) -> None:
    member = api.register()
    response = api.client.post(
        f"/accounts/{member.accounts['EUR']}/deposits",
        json={"amount": 10.5},
        headers=SUPERUSER.auth,
    )
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["amount"] == "10.50"
    assert response.get_json()["currency"] == "EUR"


def test_deposit_by_anyone_but_the_superuser_is_forbidden(api) -> None:
    member = api.register()
    response = api.client.post(
        f"/accounts/{member.accounts['USD']}/deposits", data={"amount": "5"}, headers=member.auth
    )
    assert_problem(response, 403, "forbidden")
    assert api.balance(member, member.accounts["USD"]) == "0.00"
    listed = api.client.get(f"/users/{member.id}/transfers", headers=member.auth).get_json()
    assert listed == []


def test_deposit_to_an_account_that_does_not_exist(client) -> None:
    response = client.post(
        f"/accounts/{MISSING_ID}/deposits", data={"amount": "5"}, headers=SUPERUSER.auth
    )
    assert_problem(response, 404, "account_not_found")


@pytest.mark.parametrize("amount", ["", "0", "-5", "1.001", "1e3", "abc"])
def test_deposit_with_an_invalid_amount(api, amount: str) -> None:
    member = api.register()
    response = api.client.post(
        f"/accounts/{member.accounts['USD']}/deposits",
        data={"amount": amount},
        headers=SUPERUSER.auth,
    )
    assert_problem(response, 400, "invalid_amount")


def test_deposit_idempotency(api) -> None:
    member = api.register()
    path = f"/accounts/{member.accounts['USD']}/deposits"
    headers = {**SUPERUSER.auth, "Idempotency-Key": "deposit-" + str(member.id)}
    first = api.client.post(path, data={"amount": "7.5"}, headers=headers)
    assert first.status_code == 202
    again = api.client.post(path, json={"amount": "7.50"}, headers=headers)
    assert again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]

    other_amount = api.client.post(path, data={"amount": "8"}, headers=headers)
    assert_problem(other_amount, 422, "idempotency_key_mismatch")
    other_account = api.client.post(
        f"/accounts/{member.accounts['EUR']}/deposits", data={"amount": "7.5"}, headers=headers
    )
    assert_problem(other_account, 422, "idempotency_key_mismatch")

    api.wait_final(SUPERUSER, first.get_json()["id"])
    assert api.balance(member, member.accounts["USD"]) == "7.50"
    assert api.balance(member, member.accounts["EUR"]) == "0.00"
    listed = api.client.get(f"/users/{member.id}/transfers", headers=member.auth).get_json()
    assert [t["id"] for t in listed] == [first.get_json()["id"]]


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\tkey", "caf\u00e9"])
def test_deposit_with_an_invalid_idempotency_key(api, key: str) -> None:
    member = api.register()
    response = api.client.post(
        f"/accounts/{member.accounts['USD']}/deposits",
        data={"amount": "1"},
        headers={**SUPERUSER.auth, "Idempotency-Key": key},
    )
    assert_problem(response, 400, "invalid_request")


# --- GET /accounts/{id}/postings -----------------------------------------------------------


@pytest.fixture
def statement(api):
    """Alice got 100.00, paid Bob 10.00 (+0.10 commission), got 2.50 back from Bob."""
    alice = api.funded("100.00")
    bob = api.funded("5.00")
    paid = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "10.00").get_json()
    assert api.wait_final(alice, paid["id"])["status"] == "settled"
    back = api.transfer(bob, bob.accounts["USD"], alice.accounts["USD"], "2.50").get_json()
    assert api.wait_final(bob, back["id"])["status"] == "settled"
    return alice, bob, paid["id"], back["id"]


def test_statement_amounts_and_running_balance(api, statement) -> None:
    alice, _, paid_id, back_id = statement
    response = api.client.get(f"/accounts/{alice.accounts['USD']}/postings", headers=alice.auth)

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert "Link" not in response.headers
    postings = response.get_json()
    for posting in postings:
        assert set(posting) == POSTING_FIELDS
        assert RFC3339_UTC.match(posting["created_at"])
    assert [(p["amount"], p["balance_after"]) for p in postings] == [
        ("100.00", "100.00"),
        ("-10.10", "89.90"),
        ("2.50", "92.40"),
    ]
    assert [p["transfer_id"] for p in postings][1:] == [paid_id, back_id]
    ids = [p["id"] for p in postings]
    assert ids == sorted(ids)
    assert api.balance(alice, alice.accounts["USD"]) == "92.40"


def test_statement_of_payee_and_commission_account(api, statement) -> None:
    _, bob, paid_id, back_id = statement
    bob_postings = api.client.get(
        f"/accounts/{bob.accounts['USD']}/postings", headers=bob.auth
    ).get_json()
    assert [(p["transfer_id"], p["amount"]) for p in bob_postings][1:] == [
        (paid_id, "10.00"),
        (back_id, "-2.53"),
    ]
    commission_account = superuser_account(api.client, "USD", "commission")
    newest = api.client.get(
        f"/accounts/{commission_account}/postings?sort=dsc&limit=500", headers=SUPERUSER.auth
    ).get_json()
    mine = {p["transfer_id"]: p["amount"] for p in newest if p["transfer_id"] in (paid_id, back_id)}
    assert mine == {paid_id: "0.10", back_id: "0.03"}


def test_statement_sorted_descending(api, statement) -> None:
    alice = statement[0]
    path = f"/accounts/{alice.accounts['USD']}/postings"
    ascending = api.client.get(path, headers=alice.auth).get_json()
    explicit = api.client.get(f"{path}?sort=asc", headers=alice.auth).get_json()
    descending = api.client.get(f"{path}?sort=dsc", headers=alice.auth).get_json()
    assert explicit == ascending
    assert descending == ascending[::-1]


@pytest.mark.parametrize("sort", ["asc", "dsc"])
@pytest.mark.parametrize("limit", [1, 2, 3])
def test_statement_pages_follow_the_link_header(api, statement, sort: str, limit: int) -> None:
    alice = statement[0]
    path = f"/accounts/{alice.accounts['USD']}/postings"
    everything = api.client.get(f"{path}?sort={sort}", headers=alice.auth).get_json()
    items, pages = read_all_pages(api.client, f"{path}?sort={sort}&limit={limit}", alice.auth)
    assert items == everything
    assert pages == -(-len(everything) // limit)


def test_statement_of_a_new_account_is_empty(api) -> None:
    member = api.register()
    response = api.client.get(f"/accounts/{member.accounts['EUR']}/postings", headers=member.auth)
    assert response.status_code == 200
    assert response.get_json() == []
    assert "Link" not in response.headers


def test_statement_is_not_changed_by_a_rejected_transfer(api) -> None:
    member = api.funded("1.00")
    other = api.register()
    response = api.transfer(member, member.accounts["USD"], other.accounts["USD"], "1.00")
    assert api.wait_final(member, response.get_json()["id"])["status"] == "rejected"
    postings = api.client.get(
        f"/accounts/{member.accounts['USD']}/postings", headers=member.auth
    ).get_json()
    assert [p["amount"] for p in postings] == ["1.00"]


def _cursor(sort: str, last_id: object) -> str:
    return base64.urlsafe_b64encode(f"{sort}:{last_id}".encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=-1",
        "limit=",
        "sort=up",
        "sort=ASC",
        "cursor=!!!",
        "cursor=abc",
        "cursor=" + "A" * 201,
        "cursor=" + _cursor("asc", "x"),
        "cursor=" + _cursor("asc", "-1"),
        "sort=dsc&cursor=" + _cursor("asc", 5),
    ],
)
def test_statement_with_a_bad_query(api, query: str) -> None:
    member = api.register()
    response = api.client.get(
        f"/accounts/{member.accounts['USD']}/postings?{query}", headers=member.auth
    )
    assert_problem(response, 400, "invalid_query")


def test_statement_cursor_cannot_change_the_sort_order(api, statement) -> None:
    alice = statement[0]
    path = f"/accounts/{alice.accounts['USD']}/postings"
    first = api.client.get(f"{path}?limit=1", headers=alice.auth)
    cursor = next_page(first).split("cursor=")[1]
    response = api.client.get(f"{path}?sort=dsc&cursor={cursor}", headers=alice.auth)
    assert_problem(response, 400, "invalid_query")


@pytest.mark.parametrize("limit", ["1", "500"])
def test_statement_limit_bounds_are_accepted(api, limit: str) -> None:
    member = api.register()
    response = api.client.get(
        f"/accounts/{member.accounts['USD']}/postings?limit={limit}", headers=member.auth
    )
    assert response.status_code == 200
