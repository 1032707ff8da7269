"""docs/api.md "Refunds": POST /users/{id}/transfers/{id}/refunds — who may refund what,
how much, idempotency, concurrent refunds of one transfer, and their settlement."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from common.audit import audit
from common.db import script_session
from common.doorbells import ring
from common.errors import Conflict
from common.models import SUPERUSER_ID
from common.transfers import submit_refund
from tests.conftest import (
    SUPERUSER,
    Api,
    Member,
    assert_problem,
    settlement_held,
    sweep_until,
)
from tests.test_api_keys import bearer, create_key

MISSING_ID = 2**62


def refund(
    client: Any,
    member: Member,
    transfer_id: int,
    fields: dict | None = None,
    key: str | None = None,
    *,
    as_json: bool = False,
    headers: dict[str, str] | None = None,
) -> Any:
    sent = dict(member.auth if headers is None else headers)
    if key is not None:
        sent["Idempotency-Key"] = key
    path = f"/users/{member.id}/transfers/{transfer_id}/refunds"
    if as_json:
        return client.post(path, json=fields or {}, headers=sent)
    return client.post(path, data=fields or {}, headers=sent)


def paid(api: Api, amount: str = "100.00", funds: str = "1000.00") -> tuple[Member, Member, dict]:
    """A payer, a payee and a settled payment of `amount` between them (USD)."""
    alice, bob = api.funded(funds), api.register()
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], amount)
    assert response.status_code == 202, response.get_json()
    transfer = api.wait_final(alice, response.get_json()["id"])
    assert transfer["status"] == "settled", transfer
    return alice, bob, transfer


def claimed(transfer_id: int) -> tuple[int, int]:
    """(refunds_claimed, refunded) of a transfer, in minor units."""
    with script_session() as session:
        row = session.execute(
            text("SELECT refunds_claimed, refunded FROM transfers WHERE id = :id"),
            {"id": transfer_id},
        ).one()
    return row.refunds_claimed, row.refunded


# --- accepted --------------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_a_full_refund_by_default_goes_back_without_commission(api: Api, as_json: bool) -> None:
    alice, bob, original = paid(api)
    assert api.balance(alice, alice.accounts["USD"]) == "899.00"

    response = refund(api.client, bob, original["id"], {"comment": "sorry"}, as_json=as_json)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == f"/users/{bob.id}/transfers/{body['id']}"
    assert body["status"] == "pending"
    assert body["kind"] == "refund"
    assert body["refund_of"] == original["id"]
    assert (body["from"], body["to"]) == (bob.accounts["USD"], alice.accounts["USD"])
    assert (body["from_user_id"], body["to_user_id"]) == (bob.id, alice.id)
    assert body["amount"] == "100.00"
    assert body["commission"] == "0.00"
    assert body["comment"] == "sorry"
    assert body["currency"] == "USD"
    assert (body["hold_id"], body["destination"], body["refunded"]) == (None, None, "0.00")
    assert claimed(original["id"])[0] == 10000

    final = api.wait_final(bob, body["id"])
    assert final["status"] == "settled", final
    # The commission stays with the superuser: the payer is 1.00 short of where it began.
    assert api.balance(alice, alice.accounts["USD"]) == "999.00"
    assert api.balance(bob, bob.accounts["USD"]) == "0.00"
    # Both sides see the refund.
    assert api.get_transfer(alice, body["id"])["kind"] == "refund"


def test_settling_a_refund_adds_to_the_originals_refunded(api: Api) -> None:
    alice, bob, original = paid(api)
    response = refund(api.client, bob, original["id"], {"amount": "40.00"})
    assert api.wait_final(bob, response.get_json()["id"])["status"] == "settled"
    assert api.get_transfer(alice, original["id"])["refunded"] == "40.00"
    assert api.get_transfer(bob, original["id"])["refunded"] == "40.00"
    assert claimed(original["id"]) == (4000, 4000)


def test_partial_refunds_add_up_to_the_amount_and_no_further(api: Api) -> None:
    _alice, bob, original = paid(api)
    amounts = []
    for fields in ({"amount": "30"}, {"amount": "50.5"}, {}):
        response = refund(api.client, bob, original["id"], fields)
        assert response.status_code == 202, response.get_json()
        amounts.append(response.get_json()["amount"])
    # The default is what was left: 100.00 - 30.00 - 50.50.
    assert amounts == ["30.00", "50.50", "19.50"]
    assert claimed(original["id"])[0] == 10000
    assert_problem(
        refund(api.client, bob, original["id"], {"amount": "0.01"}), 409, "refund_exceeds_transfer"
    )
    assert_problem(refund(api.client, bob, original["id"]), 409, "refund_exceeds_transfer")


def test_a_refund_larger_than_what_is_left_is_refused(api: Api) -> None:
    _alice, bob, original = paid(api, "10.00")
    assert_problem(
        refund(api.client, bob, original["id"], {"amount": "10.01"}),
        409,
        "refund_exceeds_transfer",
    )
    assert refund(api.client, bob, original["id"], {"amount": "4"}).status_code == 202
    assert_problem(
        refund(api.client, bob, original["id"], {"amount": "6.01"}),
        409,
        "refund_exceeds_transfer",
    )
    assert refund(api.client, bob, original["id"], {"amount": "6.00"}).status_code == 202
    assert claimed(original["id"])[0] == 1000


def test_pending_refunds_count_against_the_room(api: Api) -> None:
    _alice, bob, original = paid(api, "10.00")
    with settlement_held("USD"):
        assert refund(api.client, bob, original["id"], {"amount": "7"}).status_code == 202
        assert_problem(
            refund(api.client, bob, original["id"], {"amount": "3.01"}),
            409,
            "refund_exceeds_transfer",
        )
        response = refund(api.client, bob, original["id"])
        assert response.get_json()["amount"] == "3.00"


def test_a_refund_of_a_transfer_within_one_user_has_no_commission_either(api: Api) -> None:
    alice = api.funded("20.00")
    savings = api.client.post(f"/users/{alice.id}/accounts/USD", headers=alice.auth).get_json()
    response = api.transfer(alice, alice.accounts["USD"], savings["id"], "20.00")
    assert api.wait_final(alice, response.get_json()["id"])["status"] == "settled"
    back = refund(api.client, alice, response.get_json()["id"], {"amount": "5"})
    assert back.status_code == 202, back.get_json()
    assert back.get_json()["commission"] == "0.00"
    assert api.wait_final(alice, back.get_json()["id"])["status"] == "settled"
    assert api.balance(alice, alice.accounts["USD"]) == "5.00"
    assert api.balance(alice, savings["id"]) == "15.00"


# --- refused ---------------------------------------------------------------------------------


def test_only_the_payee_may_refund(api: Api) -> None:
    alice, bob, original = paid(api)
    carol = api.register()
    # The payer, a stranger, and a transfer that does not exist: all "not found".
    assert_problem(refund(api.client, alice, original["id"]), 404, "transfer_not_found")
    assert_problem(refund(api.client, carol, original["id"]), 404, "transfer_not_found")
    assert_problem(refund(api.client, bob, MISSING_ID), 404, "transfer_not_found")
    assert_problem(refund(api.client, bob, 2**63 - 1), 404, "transfer_not_found")
    assert claimed(original["id"])[0] == 0


def test_a_deposit_is_not_refundable(api: Api) -> None:
    alice = api.register()
    deposit = api.deposit(alice.accounts["USD"], "5.00")
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    assert_problem(refund(api.client, alice, deposit["id"]), 409, "not_refundable")


def test_a_refund_is_not_refundable(api: Api) -> None:
    alice, bob, original = paid(api)
    back = refund(api.client, bob, original["id"], {"amount": "1"}).get_json()
    assert api.wait_final(bob, back["id"])["status"] == "settled"
    # Alice received the refund; she cannot send it back as a refund of it.
    assert_problem(refund(api.client, alice, back["id"]), 409, "not_refundable")


def test_a_payout_is_not_refundable(api: Api) -> None:
    # A payout's payee is the superuser, which moves no money on a path (403 there): the
    # service's own rule is checked directly.
    alice = api.funded("50.00")
    response = api.client.post(
        f"/users/{alice.id}/payouts",
        data={"from": alice.accounts["USD"], "amount": "10", "destination": "IBAN X"},
        headers=alice.auth,
    )
    payout = api.wait_final(alice, response.get_json()["id"])
    assert payout["status"] == "settled", payout
    with script_session() as session, session.begin(), pytest.raises(Conflict) as refused:
        submit_refund(
            session, SUPERUSER_ID, payout["id"], amount=None, comment="", idempotency_key=None
        )
    assert refused.value.code == "not_refundable"
    assert_problem(
        refund(api.client, SUPERUSER, payout["id"]), 403, "forbidden"
    )  # the superuser's path


def test_a_pending_or_rejected_transfer_is_not_settled(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    with settlement_held("USD"):
        response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00")
        pending = response.get_json()
        assert_problem(refund(api.client, bob, pending["id"]), 409, "transfer_not_settled")
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "100.00")
    rejected = api.wait_final(alice, response.get_json()["id"])
    assert rejected["status"] == "rejected"
    assert_problem(refund(api.client, bob, rejected["id"]), 409, "transfer_not_settled")


def test_the_rules_apply_in_order(api: Api) -> None:
    """not found before not refundable before not settled before a bad amount."""
    alice = api.register()
    deposit = api.deposit(alice.accounts["USD"], "5.00")
    with settlement_held("USD"):
        # A pending deposit: not refundable wins over not settled.
        assert_problem(refund(api.client, alice, deposit["id"]), 409, "not_refundable")
    bob = api.register()
    with settlement_held("USD"):
        response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00")
        pending = response.get_json()["id"]
        # Too many decimals for USD, on a pending transfer: not settled comes first.
        fields = {"amount": "1.001"}
        assert_problem(refund(api.client, bob, pending, fields), 409, "transfer_not_settled")
        assert_problem(refund(api.client, alice, pending, fields), 404, "transfer_not_found")
    # What was left pending under the held lock settles once it is let go.
    assert api.wait_final(alice, pending)["status"] != "pending"


@pytest.mark.parametrize(
    "amount", ["0", "0.00", "-1", "1.001", "abc", "", " 1", "1e2", "NaN", "1" * 16]
)
def test_a_bad_amount_is_invalid_amount(api: Api, amount: str) -> None:
    _alice, bob, original = paid(api, "10.00")
    assert_problem(
        refund(api.client, bob, original["id"], {"amount": amount}), 400, "invalid_amount"
    )
    assert claimed(original["id"])[0] == 0


@pytest.mark.parametrize("value", [True, [], {}, ["1"], {"a": 1}, 0, -1])
def test_a_bad_json_amount_is_invalid_amount(api: Api, value: Any) -> None:
    _alice, bob, original = paid(api, "10.00")
    response = refund(api.client, bob, original["id"], {"amount": value}, as_json=True)
    assert_problem(response, 400, "invalid_amount")


def test_a_json_number_and_null_amount(api: Api) -> None:
    _alice, bob, original = paid(api, "10.00")
    response = refund(api.client, bob, original["id"], {"amount": 2.5}, as_json=True)
    assert response.get_json()["amount"] == "2.50"
    response = refund(api.client, bob, original["id"], {"amount": None}, as_json=True)
    assert response.get_json()["amount"] == "7.50"


@pytest.mark.parametrize(
    "comment", ["x" * 256, "a\x00b", 5, ["c"]], ids=["long", "nul", "number", "list"]
)
def test_a_bad_comment_is_invalid_request(api: Api, comment: Any) -> None:
    _alice, bob, original = paid(api, "10.00")
    response = refund(api.client, bob, original["id"], {"comment": comment}, as_json=True)
    assert_problem(response, 400, "invalid_request")


# --- who may call ----------------------------------------------------------------------------


def test_credentials_paths_and_scopes(api: Api) -> None:
    alice, bob, original = paid(api, "10.00")
    path = f"/users/{bob.id}/transfers/{original['id']}/refunds"
    assert_problem(api.client.post(path), 401, "unauthorized")
    # Alice on Bob's path; the superuser on anyone's.
    assert_problem(api.client.post(path, headers=alice.auth), 403, "forbidden")
    assert_problem(api.client.post(path, headers=SUPERUSER.auth), 403, "forbidden")
    read_only = create_key(api.client, bob, scopes=["read"])
    response = api.client.post(path, headers=bearer(read_only["secret"]))
    assert_problem(response, 403, "insufficient_scope")
    assert claimed(original["id"])[0] == 0
    writer = create_key(api.client, bob, scopes=["transfers"])
    response = api.client.post(path, data={"amount": "1"}, headers=bearer(writer["secret"]))
    assert response.status_code == 202, response.get_json()


# --- idempotency -----------------------------------------------------------------------------


def test_a_replay_returns_the_same_refund_and_claims_once(api: Api) -> None:
    _alice, bob, original = paid(api, "10.00")
    key = secrets.token_hex(8)
    first = refund(api.client, bob, original["id"], {"amount": "4.0"}, key)
    assert first.status_code == 202
    again = refund(api.client, bob, original["id"], {"amount": "4"}, key, as_json=True)
    assert again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert claimed(original["id"])[0] == 400
    # Other fields with the key: a mismatch, and nothing claimed.
    for fields in ({"amount": "5"}, {"amount": "4", "comment": "x"}, {}):
        response = refund(api.client, bob, original["id"], fields, key)
        assert_problem(response, 422, "idempotency_key_mismatch")
    assert claimed(original["id"])[0] == 400


def test_a_replay_of_a_defaulted_refund_after_the_room_is_gone(api: Api) -> None:
    _alice, bob, original = paid(api, "10.00")
    key = secrets.token_hex(8)
    first = refund(api.client, bob, original["id"], {}, key).get_json()
    assert first["amount"] == "10.00"
    assert api.wait_final(bob, first["id"])["status"] == "settled"
    again = refund(api.client, bob, original["id"], {}, key)
    assert again.status_code == 202
    assert again.get_json()["id"] == first["id"]
    assert again.get_json()["status"] == "settled"
    assert_problem(refund(api.client, bob, original["id"]), 409, "refund_exceeds_transfer")


def test_a_key_of_a_transfer_is_not_a_refunds(api: Api) -> None:
    _alice, bob, original = paid(api, "10.00")
    key = secrets.token_hex(8)
    carol = api.register()
    response = api.client.post(
        f"/users/{bob.id}/transfers",
        data={"from": bob.accounts["USD"], "to": carol.accounts["USD"], "amount": "1"},
        headers={**bob.auth, "Idempotency-Key": key},
    )
    assert response.status_code == 202
    assert_problem(
        refund(api.client, bob, original["id"], {"amount": "1"}, key),
        422,
        "idempotency_key_mismatch",
    )
    assert claimed(original["id"])[0] == 0


# --- concurrency -----------------------------------------------------------------------------

THREADS = 20


def _concurrently(app: Any, member: Member, transfer_id: int, jobs: list[dict]) -> list[Any]:
    def one(fields: dict) -> tuple[int, dict]:
        client = app.test_client()
        response = refund(client, member, transfer_id, fields)
        return response.status_code, response.get_json()

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, jobs))


@pytest.mark.slow
def test_twenty_concurrent_refunds_never_exceed_the_transfer(app: Any, api: Api) -> None:
    alice, bob, original = paid(api, "100.00")
    # 20 x 7.00 = 140.00 asked of 100.00: 14 fit.
    results = _concurrently(app, bob, original["id"], [{"amount": "7.00"}] * THREADS)
    statuses = sorted(status for status, _ in results)
    assert statuses == [202] * 14 + [409] * 6, results
    assert {body["code"] for status, body in results if status == 409} == {
        "refund_exceeds_transfer"
    }
    assert claimed(original["id"])[0] == 9800
    ids = [body["id"] for status, body in results if status == 202]
    for transfer_id in ids:
        assert api.wait_final(bob, transfer_id)["status"] == "settled"
    assert api.balance(alice, alice.accounts["USD"]) == "997.00"
    assert api.balance(bob, bob.accounts["USD"]) == "2.00"
    assert claimed(original["id"]) == (9800, 9800)
    with script_session() as session:
        assert audit(session) == []


@pytest.mark.slow
def test_twenty_concurrent_default_refunds_make_one(app: Any, api: Api) -> None:
    _alice, bob, original = paid(api, "100.00")
    results = _concurrently(app, bob, original["id"], [{}] * THREADS)
    accepted = [body for status, body in results if status == 202]
    assert len(accepted) == 1, results
    assert accepted[0]["amount"] == "100.00"
    assert sorted(status for status, _ in results) == [202] + [409] * (THREADS - 1)
    assert claimed(original["id"])[0] == 10000


@pytest.mark.slow
def test_twenty_concurrent_replays_of_one_key_make_one(app: Any, api: Api) -> None:
    _alice, bob, original = paid(api, "100.00")
    key = secrets.token_hex(8)

    def one(_: int) -> tuple[int, dict]:
        client = app.test_client()
        response = refund(client, bob, original["id"], {"amount": "60"}, key)
        return response.status_code, response.get_json()

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(one, range(THREADS)))
    assert {status for status, _ in results} == {202}, results
    assert len({body["id"] for _, body in results}) == 1
    assert claimed(original["id"])[0] == 6000


# --- settlement ------------------------------------------------------------------------------


def test_a_rejected_refund_gives_its_room_back(api: Api) -> None:
    alice, bob, original = paid(api, "100.00")
    carol = api.register()
    # Bob spends most of what he received: 80.00 + 0.80 commission.
    spent = api.transfer(bob, bob.accounts["USD"], carol.accounts["USD"], "80.00")
    assert api.wait_final(bob, spent.get_json()["id"])["status"] == "settled"

    response = refund(api.client, bob, original["id"])
    assert response.status_code == 202, response.get_json()
    rejected = api.wait_final(bob, response.get_json()["id"])
    assert rejected["status"] == "rejected"
    assert rejected["reason"] == "insufficient_funds"
    assert claimed(original["id"]) == (0, 0)
    assert api.get_transfer(alice, original["id"])["refunded"] == "0.00"
    assert api.balance(bob, bob.accounts["USD"]) == "19.20"
    assert api.balance(alice, alice.accounts["USD"]) == "899.00"

    # The room is there again: what Bob still has goes back.
    again = refund(api.client, bob, original["id"], {"amount": "19.20"})
    assert again.status_code == 202, again.get_json()
    assert api.wait_final(bob, again.get_json()["id"])["status"] == "settled"
    assert api.balance(bob, bob.accounts["USD"]) == "0.00"
    assert api.balance(alice, alice.accounts["USD"]) == "918.20"
    assert claimed(original["id"]) == (1920, 1920)
    assert api.get_transfer(alice, original["id"])["refunded"] == "19.20"
    with script_session() as session:
        assert audit(session) == []


def test_a_failed_refund_keeps_its_room_until_it_settles(api: Api, poison: Any) -> None:
    alice, bob, original = paid(api, "10.00")
    with settlement_held("USD"):
        response = refund(api.client, bob, original["id"], {"amount": "6.00"})
        refund_id = response.get_json()["id"]
        poison(refund_id)
    ring("USD")
    sweep_until(lambda: api.get_transfer(bob, refund_id)["status"] == "failed")
    # Its 6.00 is still claimed: only 4.00 is left.
    assert claimed(original["id"]) == (600, 0)
    assert_problem(
        refund(api.client, bob, original["id"], {"amount": "4.01"}),
        409,
        "refund_exceeds_transfer",
    )
    poison.cure(refund_id)
    sweep_until(lambda: api.get_transfer(bob, refund_id)["status"] == "settled")
    assert claimed(original["id"]) == (600, 600)
    assert api.get_transfer(alice, original["id"])["refunded"] == "6.00"
    assert api.balance(alice, alice.accounts["USD"]) == "995.90"
