"""docs/api.md "Payouts": POST /users/{id}/payouts — money out to the currency's external
account: fields, commission, idempotency, who may call, settlement and its events."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from sqlalchemy import text

from common.db import script_session
from tests.conftest import SUPERUSER, Api, Member, assert_problem
from tests.test_api_keys import bearer, create_key
from tests.test_metrics import _samples, _total

MISSING_ID = 2**62
IBAN = "DE89 3704 0044 0532 0130 00"


def payout(
    client: Any,
    member: Member,
    fields: dict,
    key: str | None = None,
    *,
    as_json: bool = False,
    headers: dict[str, str] | None = None,
) -> Any:
    sent = dict(member.auth if headers is None else headers)
    if key is not None:
        sent["Idempotency-Key"] = key
    path = f"/users/{member.id}/payouts"
    if as_json:
        return client.post(path, json=fields, headers=sent)
    return client.post(path, data=fields, headers=sent)


def superuser_account(client: Any, currency: str, kind: str) -> dict[str, Any]:
    response = client.get(f"/users/{SUPERUSER.id}/accounts", headers=SUPERUSER.auth)
    [account] = [a for a in response.get_json() if a["currency"] == currency and a["kind"] == kind]
    return account


def minor(amount: str) -> int:
    units, cents = amount.split(".")
    return int(units) * 100 + (-1 if units.startswith("-") else 1) * int(cents)


def events_of(transfer_id: int) -> list[tuple[int, str]]:
    with script_session() as session:
        rows = session.execute(
            text("SELECT user_id, type FROM events WHERE transfer_id = :id ORDER BY id"),
            {"id": transfer_id},
        )
        return [(row.user_id, row.type) for row in rows]


# --- accepted and settled --------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_a_payout_leaves_for_the_external_account_with_commission(api: Api, as_json: bool) -> None:
    alice = api.funded("100.00")
    external = superuser_account(api.client, "USD", "external")
    commission = superuser_account(api.client, "USD", "commission")
    external_before = minor(api.balance(SUPERUSER, external["id"]))
    commission_before = minor(api.balance(SUPERUSER, commission["id"]))

    fields = {"from": alice.accounts["USD"], "amount": "25.50", "destination": IBAN}
    response = payout(api.client, alice, {**fields, "comment": "rent"}, as_json=as_json)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == f"/users/{alice.id}/transfers/{body['id']}"
    assert body["status"] == "pending"
    assert body["kind"] == "payout"
    assert body["destination"] == IBAN
    assert (body["from"], body["to"]) == (alice.accounts["USD"], external["id"])
    assert (body["from_user_id"], body["to_user_id"]) == (alice.id, SUPERUSER.id)
    assert (body["amount"], body["commission"]) == ("25.50", "0.26")
    assert body["comment"] == "rent"
    assert (body["refund_of"], body["hold_id"], body["refunded"]) == (None, None, "0.00")

    final = api.wait_final(alice, body["id"])
    assert final["status"] == "settled", final
    assert final["destination"] == IBAN
    assert api.balance(alice, alice.accounts["USD"]) == "74.24"
    # The money has left Remit: the external account, which is minus what is inside,
    # moves by the amount toward zero; the commission stays inside.
    assert minor(api.balance(SUPERUSER, external["id"])) == external_before + 2550
    assert minor(api.balance(SUPERUSER, commission["id"])) == commission_before + 26


def test_the_payer_and_the_superuser_see_the_destination(api: Api) -> None:
    alice = api.funded("10.00")
    fields = {"from": alice.accounts["USD"], "amount": "1", "destination": "Zürich 🏦 #42"}
    body = payout(api.client, alice, fields, as_json=True).get_json()
    assert api.get_transfer(alice, body["id"])["destination"] == "Zürich 🏦 #42"
    assert api.get_transfer(SUPERUSER, body["id"])["destination"] == "Zürich 🏦 #42"
    listed = api.client.get(f"/users/{alice.id}/transfers", headers=alice.auth).get_json()
    assert [t["destination"] for t in listed if t["id"] == body["id"]] == ["Zürich 🏦 #42"]


def test_a_settled_payout_tells_the_payer_only(api: Api) -> None:
    alice = api.funded("10.00")
    fields = {"from": alice.accounts["USD"], "amount": "5", "destination": IBAN}
    body = payout(api.client, alice, fields).get_json()
    assert api.wait_final(alice, body["id"])["status"] == "settled"
    assert events_of(body["id"]) == [(alice.id, "transfer.settled")]


def test_a_payout_beyond_the_balance_is_rejected(api: Api) -> None:
    alice = api.funded("10.00")
    # 10.00 + 0.10 commission does not fit in 10.00.
    fields = {"from": alice.accounts["USD"], "amount": "10.00", "destination": IBAN}
    body = payout(api.client, alice, fields).get_json()
    final = api.wait_final(alice, body["id"])
    assert (final["status"], final["reason"]) == ("rejected", "insufficient_funds")
    assert api.balance(alice, alice.accounts["USD"]) == "10.00"
    assert events_of(body["id"]) == [(alice.id, "transfer.rejected")]


def test_a_payout_in_another_currency_goes_to_its_external_account(api: Api) -> None:
    alice = api.funded("50.00", "EUR")
    external = superuser_account(api.client, "EUR", "external")
    fields = {"from": alice.accounts["EUR"], "amount": "10", "destination": IBAN}
    body = payout(api.client, alice, fields).get_json()
    assert (body["to"], body["currency"], body["commission"]) == (external["id"], "EUR", "0.30")
    assert api.wait_final(alice, body["id"])["status"] == "settled"
    assert api.balance(alice, alice.accounts["EUR"]) == "39.70"


def test_payouts_are_counted_by_kind(api: Api) -> None:
    alice = api.funded("10.00")
    before = _total(_samples(api.client), "remit_transfers_accepted_total", kind="payout")
    fields = {"from": alice.accounts["USD"], "amount": "1", "destination": IBAN}
    assert payout(api.client, alice, fields).status_code == 202
    after = _total(_samples(api.client), "remit_transfers_accepted_total", kind="payout")
    assert after - before == 1


# --- refused ---------------------------------------------------------------------------------


def test_from_must_be_one_of_the_users_accounts(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    external = superuser_account(api.client, "USD", "external")
    for account in (bob.accounts["USD"], external["id"], MISSING_ID, 0, 2**63 - 1):
        fields = {"from": account, "amount": "1", "destination": IBAN}
        assert_problem(payout(api.client, alice, fields), 404, "account_not_found")


@pytest.mark.parametrize(
    "destination",
    ["", "x" * 201, "line\nbreak", "tab\there", "nul\x00", "del\x7f", "\u2028", "\u200b"],
    ids=["empty", "long", "newline", "tab", "nul", "del", "line-separator", "zero-width"],
)
def test_a_bad_destination_is_invalid_request(api: Api, destination: str) -> None:
    alice = api.funded("10.00")
    fields = {"from": alice.accounts["USD"], "amount": "1", "destination": destination}
    assert_problem(payout(api.client, alice, fields, as_json=True), 400, "invalid_request")


@pytest.mark.parametrize("value", [5, None, True, ["IBAN"], {"a": "b"}], ids=repr)
def test_a_destination_that_is_not_text_is_invalid_request(api: Api, value: Any) -> None:
    alice = api.register()
    fields = {"from": alice.accounts["USD"], "amount": "1", "destination": value}
    assert_problem(payout(api.client, alice, fields, as_json=True), 400, "invalid_request")


def test_destination_limits_that_pass(api: Api) -> None:
    alice = api.funded("10.00")
    for destination in ("x", "y" * 200, "é" * 200, " spaces kept "):
        fields = {"from": alice.accounts["USD"], "amount": "0.01", "destination": destination}
        response = payout(api.client, alice, fields)
        assert response.status_code == 202, response.get_json()
        assert response.get_json()["destination"] == destination


@pytest.mark.parametrize(
    "missing", ["from", "amount", "destination"], ids=["from", "amount", "destination"]
)
def test_every_required_field(api: Api, missing: str) -> None:
    alice = api.register()
    fields = {"from": alice.accounts["USD"], "amount": "1", "destination": IBAN}
    del fields[missing]
    code = "invalid_amount" if missing == "amount" else "invalid_request"
    assert_problem(payout(api.client, alice, fields), 400, code)


@pytest.mark.parametrize("amount", ["0", "-1", "1.001", "abc", "", "1e2", "1" * 16])
def test_a_bad_amount_is_invalid_amount(api: Api, amount: str) -> None:
    alice = api.register()
    fields = {"from": alice.accounts["USD"], "amount": amount, "destination": IBAN}
    assert_problem(payout(api.client, alice, fields), 400, "invalid_amount")


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", True, [1]], ids=repr)
def test_a_bad_from_is_invalid_request(api: Api, value: Any) -> None:
    alice = api.register()
    fields = {"from": value, "amount": "1", "destination": IBAN}
    assert_problem(payout(api.client, alice, fields, as_json=True), 400, "invalid_request")


def test_a_bad_comment_is_invalid_request(api: Api) -> None:
    alice = api.register()
    for comment in ("x" * 256, "a\x00b"):
        fields = {"from": alice.accounts["USD"], "amount": "1", "destination": IBAN}
        response = payout(api.client, alice, {**fields, "comment": comment}, as_json=True)
        assert_problem(response, 400, "invalid_request")


def test_credentials_paths_and_scopes(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    fields = {"from": alice.accounts["USD"], "amount": "1", "destination": IBAN}
    path = f"/users/{alice.id}/payouts"
    assert_problem(api.client.post(path, data=fields), 401, "unauthorized")
    assert_problem(api.client.post(path, data=fields, headers=bob.auth), 403, "forbidden")
    assert_problem(api.client.post(path, data=fields, headers=SUPERUSER.auth), 403, "forbidden")
    read_only = create_key(api.client, alice, scopes=["read"])
    response = api.client.post(path, data=fields, headers=bearer(read_only["secret"]))
    assert_problem(response, 403, "insufficient_scope")
    writer = create_key(api.client, alice, scopes=["transfers"])
    response = api.client.post(path, data=fields, headers=bearer(writer["secret"]))
    assert response.status_code == 202, response.get_json()
    assert api.balance(alice, alice.accounts["USD"]) in ("10.00", "8.99")


# --- idempotency -----------------------------------------------------------------------------


def test_a_replay_returns_the_same_payout(api: Api) -> None:
    alice = api.funded("10.00")
    key = secrets.token_hex(8)
    fields = {"from": alice.accounts["USD"], "amount": "2.5", "destination": IBAN}
    first = payout(api.client, alice, fields, key)
    assert first.status_code == 202
    again = payout(api.client, alice, {**fields, "amount": "2.50"}, key, as_json=True)
    assert again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    for changed in ({"destination": IBAN + "1"}, {"amount": "2.51"}, {"comment": "x"}):
        response = payout(api.client, alice, {**fields, **changed}, key)
        assert_problem(response, 422, "idempotency_key_mismatch")
    assert api.wait_final(alice, first.get_json()["id"])["status"] == "settled"
    assert api.balance(alice, alice.accounts["USD"]) == "7.47"


def test_a_transfers_key_is_not_a_payouts(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    key = secrets.token_hex(8)
    response = api.client.post(
        f"/users/{alice.id}/transfers",
        data={"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1"},
        headers={**alice.auth, "Idempotency-Key": key},
    )
    assert response.status_code == 202
    fields = {"from": alice.accounts["USD"], "amount": "1", "destination": IBAN}
    assert_problem(payout(api.client, alice, fields, key), 422, "idempotency_key_mismatch")
