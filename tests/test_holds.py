"""docs/api.md "Holds": recording holds, captures and voids, reading and listing them,
who may do what, what settlement makes of them (reserve, reject, capture, void,
expire), `held`/`available` on accounts, and hold events in the feed."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from common.db import script_session
from common.doorbells import ring
from common.events import event_json
from tests.conftest import (
    SUPERUSER,
    Api,
    Member,
    assert_problem,
    next_page,
    read_all_pages,
    settlement_held,
    sweep_until,
)
from tests.test_api_keys import bearer, create_key

HOLD_FIELDS = {
    "id",
    "status",
    "from",
    "to",
    "from_user_id",
    "to_user_id",
    "currency",
    "amount",
    "commission",
    "captured_amount",
    "transfer_id",
    "reason",
    "comment",
    "created_at",
    "expires_at",
    "updated_at",
}
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
MISSING_ID = 2**62
FINAL = {"rejected", "captured", "voided", "expired"}


def post_hold(
    client, member: Member, fields: dict[str, Any], key: str | None = None, *, as_json=True
):
    headers = dict(member.auth)
    if key is not None:
        headers["Idempotency-Key"] = key
    path = f"/users/{member.id}/holds"
    if as_json:
        return client.post(path, json=fields, headers=headers)
    return client.post(path, data=fields, headers=headers)


def make_hold(api: Api, payer: Member, payee: Member, amount: str, **extra: Any) -> dict:
    fields = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": amount}
    response = post_hold(api.client, payer, {**fields, **extra})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def get_hold(api: Api, member: Member, hold_id: int, query: str = "") -> dict:
    response = api.client.get(f"/users/{member.id}/holds/{hold_id}{query}", headers=member.auth)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def wait_hold(api: Api, member: Member, hold_id: int, until: set[str], timeout=20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        hold = get_hold(api, member, hold_id, "?wait=5")
        if hold["status"] in until or time.monotonic() > deadline:
            return hold
        time.sleep(0.05)


def held_hold(api: Api, payer: Member, payee: Member, amount: str, **extra: Any) -> dict:
    hold = make_hold(api, payer, payee, amount, **extra)
    held = wait_hold(api, payer, hold["id"], {"held"} | FINAL)
    assert held["status"] == "held", held
    return held


def capture(api: Api, member: Member, hold_id: int, body: dict | None = None, **headers: str):
    return api.client.post(
        f"/users/{member.id}/holds/{hold_id}/capture",
        json=body or {},
        headers={**member.auth, **headers},
    )


def void(api: Api, member: Member, hold_id: int):
    return api.client.post(f"/users/{member.id}/holds/{hold_id}/void", headers=member.auth)


def account(api: Api, member: Member, currency: str = "USD") -> dict:
    response = api.client.get(f"/accounts/{member.accounts[currency]}", headers=member.auth)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def commission_balance(api: Api, currency: str = "USD") -> str:
    accounts = api.client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    [row] = [a for a in accounts if a["currency"] == currency and a["kind"] == "commission"]
    return row["balance"]


def cents(amount: str) -> int:
    whole, _, fraction = amount.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 100 + int(fraction.ljust(2, "0")))


@pytest.fixture
def pair(api: Api) -> tuple[Member, Member]:
    return api.funded("100.00"), api.register("payee")


# --- POST /users/{id}/holds: recorded ------------------------------------------------------


def test_a_hold_is_recorded_pending_with_its_location(api: Api, pair) -> None:
    payer, payee = pair
    with settlement_held("USD"):
        response = post_hold(
            api.client,
            payer,
            {
                "from": payer.accounts["USD"],
                "to": payee.accounts["USD"],
                "amount": "10.5",
                "comment": "room 12",
                "expires_in": 3600,
            },
        )
        assert response.status_code == 202, response.get_json()
        hold = response.get_json()
        assert set(hold) == HOLD_FIELDS
        assert response.headers["Location"] == f"/users/{payer.id}/holds/{hold['id']}"
        assert hold["status"] == "pending"
        assert (hold["from"], hold["to"]) == (payer.accounts["USD"], payee.accounts["USD"])
        assert (hold["from_user_id"], hold["to_user_id"]) == (payer.id, payee.id)
        assert (hold["currency"], hold["amount"], hold["commission"]) == ("USD", "10.50", "0.11")
        assert hold["captured_amount"] is None
        assert hold["transfer_id"] is None
        assert hold["reason"] is None
        assert hold["comment"] == "room 12"
        for field in ("created_at", "expires_at", "updated_at"):
            assert RFC3339_UTC.match(hold[field]), hold[field]
        assert get_hold(api, payer, hold["id"]) == hold
        assert get_hold(api, payee, hold["id"]) == hold


def test_expiry_defaults_to_a_week(api: Api, pair) -> None:
    payer, payee = pair
    hold = make_hold(api, payer, payee, "1")
    with script_session() as session:
        expires = session.execute(
            text("SELECT expires_at - created_at FROM holds WHERE id = :id"), {"id": hold["id"]}
        ).scalar_one()
    assert abs(expires.total_seconds() - 604800) < 5


def test_a_form_takes_expires_in(api: Api, pair) -> None:
    payer, payee = pair
    fields = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1"}
    response = post_hold(api.client, payer, {**fields, "expires_in": "60"}, as_json=False)
    assert response.status_code == 202, response.get_json()


@pytest.mark.parametrize(
    "value", [59, 604801, 0, -1, "abc", 60.5, True, None, [], {}, "1e3", " 60", 10**30]
)
def test_bad_expires_in(api: Api, pair, value: Any) -> None:
    payer, payee = pair
    fields = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1"}
    response = post_hold(api.client, payer, {**fields, "expires_in": value})
    assert_problem(response, 400, "invalid_request")


def test_a_hold_between_ones_own_accounts_takes_no_commission(api: Api) -> None:
    payer = api.funded("10.00")
    eur = api.client.post(f"/users/{payer.id}/accounts/EUR", headers=payer.auth).get_json()
    second = api.client.post(f"/users/{payer.id}/accounts/USD", headers=payer.auth).get_json()
    hold = post_hold(
        api.client, payer, {"from": payer.accounts["USD"], "to": second["id"], "amount": "5"}
    ).get_json()
    assert hold["commission"] == "0.00"
    response = post_hold(
        api.client, payer, {"from": payer.accounts["USD"], "to": eur["id"], "amount": "5"}
    )
    assert_problem(response, 400, "currency_mismatch")


def test_a_hold_is_checked_as_a_transfer_is(api: Api, pair) -> None:
    payer, payee = pair
    mine, theirs = payer.accounts["USD"], payee.accounts["USD"]
    cases = [
        ({"from": theirs, "to": mine, "amount": "1"}, 404, "account_not_found"),
        ({"from": MISSING_ID, "to": theirs, "amount": "1"}, 404, "account_not_found"),
        ({"from": mine, "to": MISSING_ID, "amount": "1"}, 404, "account_not_found"),
        ({"from": mine, "to": mine, "amount": "1"}, 400, "same_account"),
        ({"from": mine, "to": payee.accounts["EUR"], "amount": "1"}, 400, "currency_mismatch"),
        ({"from": mine, "to": theirs, "amount": "0"}, 400, "invalid_amount"),
        ({"from": mine, "to": theirs, "amount": "1.001"}, 400, "invalid_amount"),
        ({"from": mine, "to": theirs}, 400, "invalid_amount"),
        ({"from": mine, "amount": "1"}, 400, "invalid_request"),
        ({"from": mine, "to": theirs, "amount": "1", "comment": "x" * 256}, 400, "invalid_request"),
    ]
    for fields, status, code in cases:
        assert_problem(post_hold(api.client, payer, fields), status, code)


def test_holds_pay_no_commission_or_external_account(api: Api, pair) -> None:
    payer, _ = pair
    accounts = api.client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    for row in accounts:
        if row["currency"] == "USD":
            fields = {"from": payer.accounts["USD"], "to": row["id"], "amount": "1"}
            assert_problem(post_hold(api.client, payer, fields), 404, "account_not_found")


def test_idempotent_replay(api: Api, pair) -> None:
    payer, payee = pair
    fields = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "3"}
    first = post_hold(api.client, payer, fields, key="hold-1")
    again = post_hold(api.client, payer, {**fields, "amount": "3.00"}, key="hold-1")
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    other = post_hold(api.client, payer, {**fields, "amount": "4"}, key="hold-1")
    assert_problem(other, 422, "idempotency_key_mismatch")
    longer = post_hold(api.client, payer, {**fields, "expires_in": 60}, key="hold-1")
    assert_problem(longer, 422, "idempotency_key_mismatch")
    assert_problem(post_hold(api.client, payer, fields, key="k" * 300), 400, "invalid_request")


# --- settlement: held, rejected ----------------------------------------------------------------


def test_a_held_hold_reserves_amount_and_commission(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "10.00")
    assert hold["reason"] is None
    shown = account(api, payer)
    assert (shown["balance"], shown["held"], shown["available"]) == ("100.00", "10.10", "89.90")
    assert account(api, payee)["held"] == "0.00"


def test_a_hold_beyond_the_available_balance_is_rejected(api: Api, pair) -> None:
    payer, payee = pair
    held_hold(api, payer, payee, "60.00")
    # 100 - 60.60 held leaves 39.40: a hold of 39.01 + 0.40 commission does not fit.
    hold = make_hold(api, payer, payee, "39.01")
    rejected = wait_hold(api, payer, hold["id"], FINAL)
    assert (rejected["status"], rejected["reason"]) == ("rejected", "insufficient_funds")
    assert account(api, payer)["held"] == "60.60"


def test_a_transfer_is_refused_when_its_funds_are_held(api: Api, pair) -> None:
    payer, payee = pair
    held_hold(api, payer, payee, "90.00")
    # The balance (100) would cover 20 + 0.20, what is available (9.10) does not.
    response = api.transfer(payer, payer.accounts["USD"], payee.accounts["USD"], "20")
    transfer = api.wait_final(payer, response.get_json()["id"])
    assert (transfer["status"], transfer["reason"]) == ("rejected", "insufficient_funds")
    assert account(api, payer)["balance"] == "100.00"


# --- capture ----------------------------------------------------------------------------------


def test_a_full_capture_moves_the_held_amount(api: Api, pair) -> None:
    payer, payee = pair
    before = cents(commission_balance(api))
    hold = held_hold(api, payer, payee, "10.00")
    response = capture(api, payer, hold["id"])
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert set(body) == HOLD_FIELDS
    assert body["status"] == "held"
    assert body["transfer_id"] is not None
    transfer = api.wait_final(payer, body["transfer_id"])
    assert (transfer["kind"], transfer["hold_id"]) == ("capture", hold["id"])
    assert (transfer["status"], transfer["amount"], transfer["commission"]) == (
        "settled",
        "10.00",
        "0.10",
    )
    captured = wait_hold(api, payer, hold["id"], FINAL)
    assert (captured["status"], captured["captured_amount"]) == ("captured", "10.00")
    assert captured["transfer_id"] == body["transfer_id"]
    shown = account(api, payer)
    assert (shown["balance"], shown["held"], shown["available"]) == ("89.90", "0.00", "89.90")
    assert account(api, payee)["balance"] == "10.00"
    assert cents(commission_balance(api)) - before == 10


def test_a_partial_capture_takes_commission_on_what_it_captures(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "50.00")
    response = capture(api, payer, hold["id"], {"amount": "20.55"})
    assert response.status_code == 202, response.get_json()
    transfer = api.wait_final(payer, response.get_json()["transfer_id"])
    # ceil(20.55 x 1%) = 0.21
    assert (transfer["status"], transfer["amount"], transfer["commission"]) == (
        "settled",
        "20.55",
        "0.21",
    )
    captured = wait_hold(api, payer, hold["id"], FINAL)
    assert (captured["status"], captured["captured_amount"]) == ("captured", "20.55")
    # The rest of the reservation is released.
    shown = account(api, payer)
    assert (shown["balance"], shown["held"], shown["available"]) == ("79.24", "0.00", "79.24")
    assert account(api, payee)["balance"] == "20.55"


def test_capture_is_the_makers_alone(api: Api, pair) -> None:
    payer, payee = pair
    third = api.register("third")
    hold = held_hold(api, payer, payee, "5.00")
    assert_problem(capture(api, payee, hold["id"]), 404, "hold_not_found")
    assert_problem(capture(api, third, hold["id"]), 404, "hold_not_found")
    assert_problem(capture(api, payer, MISSING_ID), 404, "hold_not_found")
    path = f"/users/{payer.id}/holds/{hold['id']}/capture"
    assert_problem(api.client.post(path, headers=payee.auth), 403, "forbidden")
    assert_problem(api.client.post(path, headers=SUPERUSER.auth), 403, "forbidden")


@pytest.mark.parametrize("amount", ["0", "5.01", "-1", "abc", "1.001", ""])
def test_capture_of_a_bad_amount(api: Api, pair, amount: str) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "5.00")
    assert_problem(capture(api, payer, hold["id"], {"amount": amount}), 400, "invalid_amount")


def test_capture_needs_a_held_hold(api: Api, pair) -> None:
    payer, payee = pair
    with settlement_held("USD"):
        pending = make_hold(api, payer, payee, "1.00")
        assert_problem(capture(api, payer, pending["id"]), 409, "hold_not_active")
    hold = held_hold(api, payer, payee, "5.00")
    assert capture(api, payer, hold["id"]).status_code == 202
    # One capture per hold.
    assert_problem(capture(api, payer, hold["id"]), 409, "hold_not_active")
    wait_hold(api, payer, hold["id"], FINAL)
    assert_problem(capture(api, payer, hold["id"]), 409, "hold_not_active")
    voided = held_hold(api, payer, payee, "1.00")
    assert void(api, payer, voided["id"]).status_code == 202
    assert_problem(capture(api, payer, voided["id"]), 409, "hold_not_active")


def test_capture_replays_with_its_idempotency_key(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "5.00")
    first = capture(api, payer, hold["id"], {"amount": "2"}, **{"Idempotency-Key": "cap-1"})
    again = capture(api, payer, hold["id"], {"amount": "2.00"}, **{"Idempotency-Key": "cap-1"})
    assert first.status_code == again.status_code == 202, again.get_json()
    assert again.get_json()["transfer_id"] == first.get_json()["transfer_id"]
    other = capture(api, payer, hold["id"], {"amount": "3"}, **{"Idempotency-Key": "cap-1"})
    assert_problem(other, 422, "idempotency_key_mismatch")
    # The key is the capture transfer's: a payment cannot take it too.
    payment = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "2"}
    used = api.client.post(
        f"/users/{payer.id}/transfers",
        data=payment,
        headers={**payer.auth, "Idempotency-Key": "cap-1"},
    )
    assert_problem(used, 422, "idempotency_key_mismatch")


def test_concurrent_captures_and_voids_of_one_hold_leave_one_winner(app, api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "10.00")
    paths = [f"/users/{payer.id}/holds/{hold['id']}/{('capture', 'void')[n % 2]}" for n in range(8)]

    def post(path: str) -> tuple[str, int, str | None]:
        response = app.test_client().post(path, json={}, headers=payer.auth)
        body = response.get_json()
        return path.rsplit("/", 1)[1], response.status_code, body.get("code")

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(post, paths))
    winners = {what for what, status, _ in outcomes if status == 202}
    # Either one capture won (every void and other capture refused), or a void did
    # (every capture refused; the other voids are the same void asked again).
    assert winners in ({"capture"}, {"void"}), outcomes
    accepted = [what for what, status, _ in outcomes if status == 202]
    if winners == {"capture"}:
        assert len(accepted) == 1, outcomes
    assert all(code == "hold_not_active" for _, status, code in outcomes if status != 202)
    final = wait_hold(api, payer, hold["id"], FINAL)
    assert final["status"] == ("captured" if winners == {"capture"} else "voided")
    expected = ("89.90", "0.00") if winners == {"capture"} else ("100.00", "0.00")
    shown = account(api, payer)
    assert (shown["balance"], shown["held"]) == expected


# --- void -------------------------------------------------------------------------------------


def test_a_void_releases_the_reservation(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "10.00")
    assert account(api, payer)["held"] == "10.10"
    response = void(api, payer, hold["id"])
    assert response.status_code == 202, response.get_json()
    assert set(response.get_json()) == HOLD_FIELDS
    voided = wait_hold(api, payer, hold["id"], FINAL)
    assert voided["status"] == "voided"
    shown = account(api, payer)
    assert (shown["balance"], shown["held"], shown["available"]) == ("100.00", "0.00", "100.00")


def test_the_payee_may_void_and_a_void_may_be_asked_again(api: Api, pair) -> None:
    payer, payee = pair
    third = api.register("third")
    with settlement_held("USD"):
        hold = make_hold(api, payer, payee, "1.00")
        assert_problem(void(api, third, hold["id"]), 404, "hold_not_found")
        first = void(api, payee, hold["id"])
        assert first.status_code == 202, first.get_json()
        # Still pending: the settler applies the void.
        assert first.get_json()["status"] == "pending"
        again = void(api, payer, hold["id"])
        assert again.status_code == 202
    ring("USD")  # the doorbells rung above found the lock taken
    assert wait_hold(api, payee, hold["id"], FINAL)["status"] == "voided"
    assert_problem(void(api, payer, hold["id"]), 409, "hold_not_active")
    assert_problem(void(api, payer, MISSING_ID), 404, "hold_not_found")


def test_no_void_once_a_capture_is_asked(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "2.00")
    with settlement_held("USD"):
        assert capture(api, payer, hold["id"]).status_code == 202
        assert_problem(void(api, payer, hold["id"]), 409, "hold_not_active")
    # The doorbell rung while the lock was taken found it taken: ring again.
    ring("USD")
    assert wait_hold(api, payer, hold["id"], FINAL)["status"] == "captured"


def test_a_rejected_hold_cannot_be_voided(api: Api) -> None:
    payer, payee = api.register("poor"), api.register("payee")
    hold = make_hold(api, payer, payee, "1.00")
    assert wait_hold(api, payer, hold["id"], FINAL)["status"] == "rejected"
    assert_problem(void(api, payer, hold["id"]), 409, "hold_not_active")


# --- expiry -----------------------------------------------------------------------------------


def test_an_expired_hold_releases_its_reservation(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "10.00", expires_in=60)
    with script_session() as session, session.begin():
        session.execute(
            text("UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": hold["id"]},
        )
    sweep_until(lambda: get_hold(api, payer, hold["id"])["status"] == "expired")
    assert account(api, payer)["held"] == "0.00"
    assert_problem(capture(api, payer, hold["id"]), 409, "hold_not_active")
    assert_problem(void(api, payer, hold["id"]), 409, "hold_not_active")


# --- reading --------------------------------------------------------------------------------


def test_who_may_read_a_hold(api: Api, pair) -> None:
    payer, payee = pair
    third = api.register("third")
    hold = make_hold(api, payer, payee, "1.00")
    assert get_hold(api, payer, hold["id"])["id"] == hold["id"]
    assert get_hold(api, payee, hold["id"])["id"] == hold["id"]
    response = api.client.get(f"/users/{third.id}/holds/{hold['id']}", headers=third.auth)
    assert_problem(response, 404, "hold_not_found")
    response = api.client.get(f"/users/1/holds/{hold['id']}", headers=SUPERUSER.auth)
    assert response.status_code == 200
    response = api.client.get(f"/users/{payer.id}/holds/{MISSING_ID}", headers=payer.auth)
    assert_problem(response, 404, "hold_not_found")
    response = api.client.get(f"/users/{payer.id}/holds/{hold['id']}", headers=third.auth)
    assert_problem(response, 403, "forbidden")


def test_wait_answers_once_settlement_is_done(api: Api, pair) -> None:
    payer, payee = pair
    hold = make_hold(api, payer, payee, "1.00")
    held = get_hold(api, payer, hold["id"], "?wait=10")
    assert held["status"] == "held"
    with settlement_held("USD"):
        assert void(api, payer, hold["id"]).status_code == 202
        started = time.monotonic()
        response = api.client.get(
            f"/users/{payer.id}/holds/{hold['id']}?wait=0.5", headers=payer.auth
        )
        assert time.monotonic() - started >= 0.4
        # The void is still to be applied: not done yet.
        assert response.get_json()["status"] == "held"
        assert response.headers["Retry-After"] == "1"
    # The doorbell rung while the lock was taken found it taken: ring again, and the
    # long poll is woken by the settler's announcement.
    ring("USD")
    started = time.monotonic()
    response = api.client.get(f"/users/{payer.id}/holds/{hold['id']}?wait=10", headers=payer.auth)
    assert response.get_json()["status"] == "voided"
    assert "Retry-After" not in response.headers
    assert time.monotonic() - started < 9


@pytest.mark.parametrize("wait", ["-1", "31", "abc", "1e1", ""])
def test_bad_wait(api: Api, pair, wait: str) -> None:
    payer, payee = pair
    hold = make_hold(api, payer, payee, "1.00")
    path = f"/users/{payer.id}/holds/{hold['id']}?wait={wait}"
    response = api.client.get(path, headers=payer.auth)
    if wait == "":
        assert response.status_code in (200, 400)
    else:
        assert_problem(response, 400, "invalid_query")


def test_list_both_sides_with_filters_and_pages(api: Api, pair) -> None:
    payer, payee = pair
    other = api.funded("10.00")
    with settlement_held("USD"):
        made = [make_hold(api, payer, payee, f"{n}.00")["id"] for n in range(1, 6)]
        received = make_hold(api, other, payer, "1.00")["id"]
        elsewhere = make_hold(api, other, payee, "1.00")["id"]
        items, pages = read_all_pages(api.client, f"/users/{payer.id}/holds?limit=2", payer.auth)
        assert [h["id"] for h in items] == [*made, received]
        assert pages == 3
        assert all(set(h) == HOLD_FIELDS for h in items)
        items, _ = read_all_pages(
            api.client, f"/users/{payer.id}/holds?limit=4&sort=dsc", payer.auth
        )
        assert [h["id"] for h in items] == [received, *reversed(made)]
        assert elsewhere not in [h["id"] for h in items]
        assert void(api, payer, made[0]).status_code == 202
    ring("USD")  # the doorbells rung above found the lock taken
    wait_hold(api, payer, made[0], FINAL)
    response = api.client.get(f"/users/{payer.id}/holds?status=voided", headers=payer.auth)
    assert [h["id"] for h in response.get_json()] == [made[0]]
    response = api.client.get(f"/users/{payer.id}/holds?limit=1", headers=payer.auth)
    assert next_page(response) is not None


@pytest.mark.parametrize(
    "query",
    ["status=gone", "sort=up", "limit=0", "limit=501", "limit=x", "cursor=!!", "cursor=ZHNjOjE"],
)
def test_bad_list_query(api: Api, pair, query: str) -> None:
    payer, _ = pair
    response = api.client.get(f"/users/{payer.id}/holds?{query}", headers=payer.auth)
    assert_problem(response, 400, "invalid_query")


# --- authentication and scopes on every route -------------------------------------------------


def _routes(payer: Member, payee: Member, hold_id: int) -> list[tuple[str, str, dict | None]]:
    body = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1"}
    return [
        ("POST", f"/users/{payer.id}/holds", body),
        ("GET", f"/users/{payer.id}/holds", None),
        ("GET", f"/users/{payer.id}/holds/{hold_id}", None),
        ("POST", f"/users/{payer.id}/holds/{hold_id}/capture", {}),
        ("POST", f"/users/{payer.id}/holds/{hold_id}/void", None),
    ]


def _call(api: Api, method: str, path: str, body: dict | None, headers: dict[str, str]):
    return api.client.open(path, method=method, json=body, headers=headers)


def test_every_route_needs_credentials_and_its_own_path(api: Api, pair) -> None:
    payer, payee = pair
    third = api.register("third")
    hold = make_hold(api, payer, payee, "1.00")
    for method, path, body in _routes(payer, payee, hold["id"]):
        assert_problem(_call(api, method, path, body, {}), 401, "unauthorized")
        assert_problem(_call(api, method, path, body, third.auth), 403, "forbidden")


def test_a_read_key_cannot_hold_capture_or_void(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "1.00")
    read = bearer(create_key(api.client, payer, scopes=["read"])["secret"])
    pay = bearer(create_key(api.client, payer, scopes=["transfers"])["secret"])
    for method, path, body in _routes(payer, payee, hold["id"]):
        if method == "POST":
            assert_problem(_call(api, method, path, body, read), 403, "insufficient_scope")
        else:
            assert _call(api, method, path, body, read).status_code == 200
            assert_problem(_call(api, method, path, body, pay), 403, "insufficient_scope")
    response = _call(api, *_routes(payer, payee, hold["id"])[3], pay)
    assert response.status_code == 202, response.get_json()


# --- events -----------------------------------------------------------------------------------


def test_hold_events_in_the_feed(api: Api, pair) -> None:
    payer, payee = pair
    hold = held_hold(api, payer, payee, "3.00")
    response = capture(api, payer, hold["id"], {"amount": "1"})
    assert response.status_code == 202
    wait_hold(api, payer, hold["id"], FINAL)
    voided = held_hold(api, payer, payee, "1.00")
    void(api, payer, voided["id"])
    wait_hold(api, payer, voided["id"], FINAL)

    def hold_events() -> list[dict]:
        feed = api.client.get(f"/users/{payer.id}/events", headers=payer.auth).get_json()
        return [e for e in feed if e["type"].startswith("hold.")]

    deadline = time.monotonic() + 10
    while len(hold_events()) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    events = hold_events()
    assert [(e["type"], e["data"]["id"]) for e in events] == [
        ("hold.held", hold["id"]),
        ("hold.captured", hold["id"]),
        ("hold.held", voided["id"]),
        ("hold.voided", voided["id"]),
    ]
    held, captured = events[0]["data"], events[1]["data"]
    assert set(held) == HOLD_FIELDS
    # The hold as it was then: held, nothing captured yet.
    assert (held["status"], held["captured_amount"], held["transfer_id"]) == ("held", None, None)
    assert held["updated_at"] == events[0]["created_at"]
    assert (captured["status"], captured["captured_amount"]) == ("captured", "1.00")
    assert events[3]["data"]["status"] == "voided"
    # A webhook's body is the same event object.
    with script_session() as session:
        for event in events:
            assert event_json(session, int(event["id"])) == event
    typed = api.client.get(
        f"/users/{payer.id}/events?type=hold.voided", headers=payer.auth
    ).get_json()
    assert [e["data"]["id"] for e in typed] == [voided["id"]]
