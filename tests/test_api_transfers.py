"""docs/api.md: POST /users/{id}/transfers, GET /users/{id}/transfers[/{id}]: acceptance,
commission, settlement outcomes, idempotency, listing filters and pagination."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import SUPERUSER, Api, Member, assert_problem, next_page, read_all_pages

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
TRANSFER_FIELDS = {
    "id",
    "status",
    "from",
    "to",
    "from_user_id",
    "to_user_id",
    "currency",
    "amount",
    "commission",
    "comment",
    "reason",
    "created_at",
    "settled_at",
    *("kind", "refund_of", "refunded", "hold_id", "destination"),
}
MISSING_ID = 2**62


def post_transfer(client, member: Member, fields: dict, key: str | None = None, *, as_json=False):
    headers = dict(member.auth)
    if key is not None:
        headers["Idempotency-Key"] = key
    if as_json:
        return client.post(f"/users/{member.id}/transfers", json=fields, headers=headers)
    return client.post(f"/users/{member.id}/transfers", data=fields, headers=headers)


def list_ids(client, member: Member, query: str = "") -> list[int]:
    response = client.get(f"/users/{member.id}/transfers?{query}", headers=member.auth)
    assert response.status_code == 200, response.get_json()
    return [t["id"] for t in response.get_json()]


def commission_posting(client, transfer_id: int, currency: str) -> str | None:
    accounts = client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    [account] = [a for a in accounts if a["currency"] == currency and a["kind"] == "commission"]
    postings = client.get(
        f"/accounts/{account['id']}/postings?sort=dsc&limit=500", headers=SUPERUSER.auth
    ).get_json()
    amounts = [p["amount"] for p in postings if p["transfer_id"] == transfer_id]
    assert len(amounts) <= 1
    return amounts[0] if amounts else None


# --- POST /users/{id}/transfers: accepted ----------------------------------------------


@pytest.mark.parametrize("encoding", ["form", "multipart", "json"])
def test_transfer_is_accepted_pending_with_location(api, encoding: str) -> None:
    alice = api.register()
    bob = api.register()
    fields = {
        "from": alice.accounts["USD"],
        "to": bob.accounts["USD"],
        "amount": "10",
        "comment": "rent",
    }
    path = f"/users/{alice.id}/transfers"
    if encoding == "json":
        response = api.client.post(path, json=fields, headers=alice.auth)
    elif encoding == "multipart":
        response = api.client.post(
            path, data=fields, headers=alice.auth, content_type="multipart/form-data"
        )
    else:
        response = api.client.post(path, data=fields, headers=alice.auth)

    assert response.status_code == 202, response.get_json()
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == TRANSFER_FIELDS
    assert body["status"] == "pending"
    assert body["from"] == alice.accounts["USD"]
    assert body["to"] == bob.accounts["USD"]
    assert body["from_user_id"] == alice.id
    assert body["to_user_id"] == bob.id
    assert body["currency"] == "USD"
    assert body["amount"] == "10.00"
    assert body["commission"] == "0.10"
    assert body["comment"] == "rent"
    assert body["reason"] is None
    assert body["settled_at"] is None
    assert RFC3339_UTC.match(body["created_at"])
    assert response.headers["Location"] == f"/users/{alice.id}/transfers/{body['id']}"

    again = api.client.get(response.headers["Location"], headers=alice.auth)
    assert again.status_code == 200
    assert again.mimetype == "application/json"
    assert again.get_json()["id"] == body["id"]
    # Alice has no money: the worker rejects it, but only after it was accepted.
    final = api.wait_final(alice, body["id"])
    assert final["status"] == "rejected"
    assert final["reason"] == "insufficient_funds"


def test_comment_is_optional(api) -> None:
    alice, bob = api.register(), api.register()
    response = api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], "1")
    assert response.status_code == 202
    assert response.get_json()["comment"] == ""


def test_comment_may_be_255_characters_of_unicode(api) -> None:
    alice, bob = api.register(), api.register()
    comment = ("für 🍕 " * 50)[:255]
    fields = {"from": alice.accounts["EUR"], "to": bob.accounts["EUR"], "amount": "1"}
    response = post_transfer(api.client, alice, {**fields, "comment": comment}, as_json=True)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["comment"] == comment


@pytest.mark.parametrize(
    ("currency", "amount", "commission"),
    [
        ("USD", "10.00", "0.10"),
        ("USD", "0.01", "0.01"),
        ("USD", "10.01", "0.11"),
        ("USD", "123.45", "1.24"),
        ("USD", "100", "1.00"),
        ("USD", "999999999999999.99", "10000000000000.00"),
        ("CNY", "12.34", "0.25"),
        ("CNY", "50", "1.00"),
        ("EUR", "0.33", "0.01"),
        ("EUR", "33.33", "1.00"),
        ("EUR", "33.34", "1.01"),
    ],
)
def test_commission_is_the_ceiling_of_amount_times_rate(
    api, currency: str, amount: str, commission: str
) -> None:
    alice, bob = api.register(), api.register()
    response = api.transfer(alice, alice.accounts[currency], bob.accounts[currency], amount)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["commission"] == commission
    assert response.get_json()["currency"] == currency


def test_settled_transfer_moves_amount_plus_commission(api) -> None:
    alice = api.funded("50.00", "CNY")
    bob = api.register()
    response = api.transfer(alice, alice.accounts["CNY"], bob.accounts["CNY"], "12.34")
    assert response.status_code == 202
    body = response.get_json()
    assert body["commission"] == "0.25"

    final = api.wait_final(alice, body["id"])
    assert final["status"] == "settled"
    assert final["reason"] is None
    assert RFC3339_UTC.match(final["settled_at"])
    assert api.balance(alice, alice.accounts["CNY"]) == "37.41"
    assert api.balance(bob, bob.accounts["CNY"]) == "12.34"
    assert commission_posting(api.client, body["id"], "CNY") == "0.25"
    # The payee sees it too, as settled.
    assert api.get_transfer(bob, body["id"])["status"] == "settled"


def test_no_commission_between_accounts_of_the_same_user(api) -> None:
    alice = api.funded("20.00")
    second = api.client.post(f"/users/{alice.id}/accounts/USD", headers=alice.auth).get_json()
    response = api.transfer(alice, alice.accounts["USD"], second["id"], "20.00")
    assert response.status_code == 202
    assert response.get_json()["commission"] == "0.00"
    assert response.get_json()["to_user_id"] == alice.id

    final = api.wait_final(alice, response.get_json()["id"])
    assert final["status"] == "settled"
    assert api.balance(alice, alice.accounts["USD"]) == "0.00"
    assert api.balance(alice, second["id"]) == "20.00"
    assert commission_posting(api.client, final["id"], "USD") is None


def test_the_superusers_commission_and_external_accounts_take_no_transfers(api) -> None:
    """Money leaves only by payouts, and commission only by settlement: as unknown accounts."""
    alice = api.funded("20.00")
    accounts = api.client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    house = [a["id"] for a in accounts if a["currency"] == "USD"]
    assert len(house) == 2  # the USD commission and external accounts
    for target in house:
        response = api.transfer(alice, alice.accounts["USD"], target, "10.00")
        assert_problem(response, 404, "account_not_found")
        path = f"/users/{alice.id}/transfers/batch"
        batch = {"transfers": [{"from": alice.accounts["USD"], "to": target, "amount": "1"}]}
        response = api.client.post(path, json=batch, headers=alice.auth)
        assert response.status_code == 202
        assert response.get_json()["results"][0]["status"] == 404
    assert api.balance(alice, alice.accounts["USD"]) == "20.00"


# --- insufficient funds: accepted, then rejected -----------------------------------------


def test_insufficient_funds_is_accepted_then_rejected_without_moving_money(api) -> None:
    alice = api.funded("10.00")
    bob = api.register()
    # 10.00 is there, but the commission is paid on top: 10.10 is needed.
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "10.00")
    assert response.status_code == 202
    assert response.get_json()["status"] == "pending"

    final = api.wait_final(alice, response.get_json()["id"])
    assert final["status"] == "rejected"
    assert final["reason"] == "insufficient_funds"
    assert final["settled_at"] is None
    assert api.balance(alice, alice.accounts["USD"]) == "10.00"
    assert api.balance(bob, bob.accounts["USD"]) == "0.00"
    assert commission_posting(api.client, final["id"], "USD") is None
    for member in (alice, bob):
        postings = api.client.get(
            f"/accounts/{member.accounts['USD']}/postings", headers=member.auth
        ).get_json()
        assert final["id"] not in [p["transfer_id"] for p in postings]


def test_exact_balance_is_enough(api) -> None:
    alice = api.funded("10.10")
    bob = api.register()
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "10.00")
    assert api.wait_final(alice, response.get_json()["id"])["status"] == "settled"
    assert api.balance(alice, alice.accounts["USD"]) == "0.00"
    assert api.balance(bob, bob.accounts["USD"]) == "10.00"


# --- POST /users/{id}/transfers: refused at once ------------------------------------------


def test_from_an_account_of_another_user(api) -> None:
    alice, bob = api.funded("5.00"), api.register()
    response = api.transfer(bob, alice.accounts["USD"], bob.accounts["USD"], "1.00")
    assert_problem(response, 404, "account_not_found")
    assert api.balance(alice, alice.accounts["USD"]) == "5.00"
    assert list_ids(api.client, bob) == []


def test_from_an_account_that_does_not_exist(api) -> None:
    alice = api.register()
    response = api.transfer(alice, MISSING_ID, alice.accounts["USD"], "1.00")
    assert_problem(response, 404, "account_not_found")


def test_to_an_account_that_does_not_exist(api) -> None:
    alice = api.register()
    response = api.transfer(alice, alice.accounts["USD"], MISSING_ID, "1.00")
    assert_problem(response, 404, "account_not_found")


def test_from_and_to_the_same_account(api) -> None:
    alice = api.funded("5.00")
    response = api.transfer(alice, alice.accounts["USD"], alice.accounts["USD"], "1.00")
    assert_problem(response, 400, "same_account")
    assert list_ids(api.client, alice, "from=" + str(alice.id)) == []


@pytest.mark.parametrize(("source", "target"), [("USD", "EUR"), ("CNY", "USD"), ("EUR", "CNY")])
def test_currency_mismatch(api, source: str, target: str) -> None:
    alice, bob = api.funded("5.00", source), api.register()
    response = api.transfer(alice, alice.accounts[source], bob.accounts[target], "1.00")
    assert_problem(response, 400, "currency_mismatch")
    own = api.transfer(alice, alice.accounts[source], alice.accounts[target], "1.00")
    assert_problem(own, 400, "currency_mismatch")


@pytest.mark.parametrize("missing", ["from", "to"])
def test_missing_account_field(api, missing: str) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1"}
    del fields[missing]
    assert_problem(post_transfer(api.client, alice, fields), 400, "invalid_request")


def test_missing_amount(api) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"]}
    assert_problem(post_transfer(api.client, alice, fields), 400, "invalid_amount")


def test_more_fractional_digits_than_the_currency_has(api) -> None:
    alice, bob = api.register(), api.register()
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.001")
    assert_problem(response, 400, "invalid_amount")


def test_comment_longer_than_255_characters(api) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1"}
    response = post_transfer(api.client, alice, {**fields, "comment": "x" * 256})
    assert_problem(response, 400, "invalid_request")


def test_json_ids_may_be_strings_of_digits(api) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": str(alice.accounts["USD"]), "to": str(bob.accounts["USD"]), "amount": "1"}
    response = post_transfer(api.client, alice, fields, as_json=True)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["from"] == alice.accounts["USD"]


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        (10.5, "10.50"),
        (10, "10.00"),
        (0.01, "0.01"),
        (999999999999999, "999999999999999.00"),
        (123456789012.34, "123456789012.34"),
    ],
)
def test_json_numbers_are_accepted_as_amounts(api, amount: float, shown: str) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": amount}
    response = post_transfer(api.client, alice, fields, as_json=True)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["amount"] == shown


# --- GET /users/{id}/transfers/{id} ----------------------------------------------------


def test_transfer_that_does_not_exist(api) -> None:
    alice = api.register()
    response = api.client.get(f"/users/{alice.id}/transfers/{MISSING_ID}", headers=alice.auth)
    assert_problem(response, 404, "transfer_not_found")


def test_transfer_between_others_is_not_found(api) -> None:
    alice, bob, carol = api.register(), api.register(), api.register()
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1")
    transfer_id = response.get_json()["id"]
    assert api.get_transfer(bob, transfer_id)["id"] == transfer_id
    stranger = api.client.get(f"/users/{carol.id}/transfers/{transfer_id}", headers=carol.auth)
    body = assert_problem(stranger, 404, "transfer_not_found")
    assert str(alice.accounts["USD"]) not in body["detail"]


# --- idempotency ----------------------------------------------------------------------------


@pytest.fixture
def pair(api) -> tuple[Member, Member]:
    return api.funded("100.00"), api.register()


def test_same_key_same_fields_returns_the_same_transfer(api, pair) -> None:
    alice, bob = pair
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "10.5"}
    first = post_transfer(api.client, alice, fields, "pay-bob-1")
    assert first.status_code == 202
    api.wait_final(alice, first.get_json()["id"])

    again = post_transfer(api.client, alice, {**fields, "amount": "10.50"}, "pay-bob-1")
    assert again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    # The replay shows the transfer's current state.
    assert again.get_json()["status"] == "settled"

    as_json = post_transfer(
        api.client,
        alice,
        {"from": str(fields["from"]), "to": fields["to"], "amount": 10.5},
        "pay-bob-1",
        as_json=True,
    )
    assert as_json.status_code == 202
    assert as_json.get_json()["id"] == first.get_json()["id"]

    # One row only: Alice's list holds her deposit and this transfer, once.
    listed = list_ids(api.client, alice)
    assert len(listed) == 2
    assert listed.count(first.get_json()["id"]) == 1
    assert api.balance(alice, alice.accounts["USD"]) == "89.39"
    assert api.balance(bob, bob.accounts["USD"]) == "10.50"


@pytest.mark.parametrize(
    "change", [{"amount": "10.51"}, {"comment": "other"}, {"to": "OTHER"}, {"from": "SECOND"}]
)
def test_same_key_other_fields_is_a_mismatch(api, pair, change: dict) -> None:
    alice, bob = pair
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "10.5"}
    first = post_transfer(api.client, alice, fields, "pay-bob-2")
    assert first.status_code == 202
    if change.get("to") == "OTHER":
        change = {"to": bob.accounts["CNY"]}
    if change.get("from") == "SECOND":
        second = api.client.post(f"/users/{alice.id}/accounts/USD", headers=alice.auth)
        change = {"from": second.get_json()["id"]}

    response = post_transfer(api.client, alice, {**fields, **change}, "pay-bob-2")
    assert_problem(response, 422, "idempotency_key_mismatch")
    assert len(list_ids(api.client, alice, "from=" + str(alice.id))) == 1


def test_keys_are_scoped_per_user(api) -> None:
    alice, bob, carol = api.register(), api.register(), api.register()
    a = post_transfer(
        api.client,
        alice,
        {"from": alice.accounts["USD"], "to": carol.accounts["USD"], "amount": "1"},
        "shared-key",
    )
    b = post_transfer(
        api.client,
        bob,
        {"from": bob.accounts["USD"], "to": carol.accounts["USD"], "amount": "2"},
        "shared-key",
    )
    assert a.status_code == b.status_code == 202
    assert a.get_json()["id"] != b.get_json()["id"]
    assert b.get_json()["amount"] == "2.00"


def test_no_key_means_no_deduplication(api, pair) -> None:
    alice, bob = pair
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1"}
    first = post_transfer(api.client, alice, fields)
    second = post_transfer(api.client, alice, fields)
    assert first.get_json()["id"] != second.get_json()["id"]


def test_replay_of_a_rejected_transfer_stays_rejected(api) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1"}
    first = post_transfer(api.client, alice, fields, "broke")
    assert api.wait_final(alice, first.get_json()["id"])["status"] == "rejected"
    again = post_transfer(api.client, alice, fields, "broke")
    assert again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["status"] == "rejected"
    assert again.get_json()["reason"] == "insufficient_funds"


@pytest.mark.parametrize(
    "key", ["", "k" * 256, "new\x7fline", "tab\tkey", "caf\u00e9", "bell\x07"], ids=repr
)
def test_invalid_idempotency_key(api, key: str) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1"}
    assert_problem(post_transfer(api.client, alice, fields, key), 400, "invalid_request")
    assert list_ids(api.client, alice) == []


@pytest.mark.parametrize("key", ["k", "k" * 255, " !~", "550e8400-e29b-41d4-a716-446655440000"])
def test_valid_idempotency_keys(api, key: str) -> None:
    alice, bob = api.register(), api.register()
    fields = {"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1"}
    first = post_transfer(api.client, alice, fields, key)
    assert first.status_code == 202, first.get_json()
    again = post_transfer(api.client, alice, fields, key)
    assert again.get_json()["id"] == first.get_json()["id"]


# --- GET /users/{id}/transfers --------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(app, settlement_worker) -> dict:
    """Alice's transfers, all final: her deposit, and transfers with Bob and Carol."""
    api = Api(app.test_client())
    alice, bob, carol = api.funded("100.00"), api.funded("100.00"), api.register()
    usd = {member.id: member.accounts["USD"] for member in (alice, bob, carol)}
    deposit = api.client.get(f"/users/{alice.id}/transfers", headers=alice.auth).get_json()

    def pay(payer: Member, payee: Member, amount: str) -> int:
        response = api.transfer(payer, usd[payer.id], usd[payee.id], amount)
        assert response.status_code == 202
        return response.get_json()["id"]

    ids = {
        "deposit": deposit[0]["id"],
        "alice_bob": pay(alice, bob, "1.00"),
        "bob_alice": pay(bob, alice, "2.00"),
        "alice_carol": pay(alice, carol, "3.00"),
        "alice_bob_broke": pay(alice, bob, "500.00"),
        "carol_alice_broke": pay(carol, alice, "10.00"),
    }
    for transfer_id in ids.values():
        assert api.wait_final(SUPERUSER, transfer_id)["status"] in ("settled", "rejected")
    return {"alice": alice, "bob": bob, "carol": carol, "ids": ids}


def test_list_shows_all_transfers_from_and_to_the_user(client, ledger) -> None:
    alice, ids = ledger["alice"], ledger["ids"]
    response = client.get(f"/users/{alice.id}/transfers", headers=alice.auth)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert "Link" not in response.headers
    body = response.get_json()
    assert [t["id"] for t in body] == sorted(ids.values())
    assert all(set(t) == TRANSFER_FIELDS for t in body)
    by_id = {t["id"]: t for t in body}
    assert by_id[ids["alice_bob_broke"]]["status"] == "rejected"
    assert by_id[ids["alice_bob_broke"]]["reason"] == "insufficient_funds"
    assert by_id[ids["alice_bob"]]["status"] == "settled"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("from={alice}", ["alice_bob", "alice_carol", "alice_bob_broke"]),
        ("to={alice}", ["deposit", "bob_alice", "carol_alice_broke"]),
        ("from={bob}", ["bob_alice"]),
        ("to={bob}", ["alice_bob", "alice_bob_broke"]),
        ("to={carol}", ["alice_carol"]),
        ("from=1", ["deposit"]),
        ("from={alice}&to={bob}", ["alice_bob", "alice_bob_broke"]),
        ("from={carol}&to={bob}", []),
        ("status=rejected", ["alice_bob_broke", "carol_alice_broke"]),
        ("status=settled", ["deposit", "alice_bob", "bob_alice", "alice_carol"]),
        ("status=pending", []),
        ("status=failed", []),
        ("from={alice}&status=settled", ["alice_bob", "alice_carol"]),
    ],
)
def test_list_filters(client, ledger, query: str, expected: list[str]) -> None:
    alice, ids = ledger["alice"], ledger["ids"]
    query = query.format(**{name: ledger[name].id for name in ("alice", "bob", "carol")})
    assert list_ids(client, alice, query) == sorted(ids[name] for name in expected)


def test_list_sort_orders(client, ledger) -> None:
    alice = ledger["alice"]
    ascending = list_ids(client, alice)
    assert ascending == sorted(ascending)
    assert list_ids(client, alice, "sort=asc") == ascending
    assert list_ids(client, alice, "sort=dsc") == ascending[::-1]


def test_list_limit(client, ledger) -> None:
    alice = ledger["alice"]
    everything = list_ids(client, alice)
    assert list_ids(client, alice, "limit=2") == everything[:2]
    assert list_ids(client, alice, "limit=2&sort=dsc") == everything[::-1][:2]
    assert list_ids(client, alice, "limit=500") == everything


@pytest.mark.parametrize("sort", ["asc", "dsc"])
@pytest.mark.parametrize("limit", [1, 2, 4, 5, 6, 7])
def test_list_pagination_sees_every_transfer_once(client, ledger, sort: str, limit: int) -> None:
    alice = ledger["alice"]
    everything = list_ids(client, alice, f"sort={sort}")
    items, pages = read_all_pages(
        client, f"/users/{alice.id}/transfers?sort={sort}&limit={limit}", alice.auth
    )
    assert [t["id"] for t in items] == everything
    assert pages == -(-len(everything) // limit)


def test_list_pagination_keeps_the_filters(client, ledger) -> None:
    alice, ids = ledger["alice"], ledger["ids"]
    first = client.get(
        f"/users/{alice.id}/transfers?status=settled&from={alice.id}&limit=1", headers=alice.auth
    )
    query = parse_qs(urlsplit(next_page(first)).query)
    assert query["status"] == ["settled"]
    assert query["from"] == [str(alice.id)]
    assert query["limit"] == ["1"]
    items, _ = read_all_pages(
        client, f"/users/{alice.id}/transfers?status=settled&from={alice.id}&limit=1", alice.auth
    )
    assert [t["id"] for t in items] == [ids["alice_bob"], ids["alice_carol"]]


def test_list_cursor_from_another_sort_order_is_refused(client, ledger) -> None:
    alice = ledger["alice"]
    first = client.get(f"/users/{alice.id}/transfers?limit=1", headers=alice.auth)
    [cursor] = parse_qs(urlsplit(next_page(first)).query)["cursor"]
    response = client.get(
        f"/users/{alice.id}/transfers?sort=dsc&limit=1&cursor={cursor}", headers=alice.auth
    )
    assert_problem(response, 400, "invalid_query")


def test_superuser_lists_a_users_transfers(client, ledger) -> None:
    alice = ledger["alice"]
    mine = list_ids(client, alice)
    response = client.get(f"/users/{alice.id}/transfers", headers=SUPERUSER.auth)
    assert response.status_code == 200
    assert [t["id"] for t in response.get_json()] == mine


def test_list_of_a_new_user_is_empty(api) -> None:
    member = api.register()
    response = api.client.get(f"/users/{member.id}/transfers", headers=member.auth)
    assert response.status_code == 200
    assert response.get_json() == []
    assert "Link" not in response.headers


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "sort=up",
        "sort=desc",
        "status=bogus",
        "status=SETTLED",
        "from=abc",
        "from=-1",
        "to=1.5",
        "to=99999999999999999999",
        "cursor=!!!",
        "cursor=bm90LWEtY3Vyc29y",
        "cursor=" + "A" * 201,
    ],
)
def test_list_with_a_bad_query(client, ledger, query: str) -> None:
    alice = ledger["alice"]
    response = client.get(f"/users/{alice.id}/transfers?{query}", headers=alice.auth)
    assert_problem(response, 400, "invalid_query")
