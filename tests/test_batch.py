"""POST /users/{id}/transfers/batch: items accepted independently, results in item order."""

from __future__ import annotations

from tests.conftest import Api


def test_batch_accepts_each_item_on_its_own(api: Api) -> None:
    alice, bob = api.funded("100.00"), api.register()
    source, target = alice.accounts["USD"], bob.accounts["USD"]
    items = [
        {"from": source, "to": target, "amount": "1.00", "comment": "first"},
        {"from": source, "to": target, "amount": "-1"},
        {"from": source, "to": source, "amount": "1.00"},
        {"from": source, "to": bob.accounts["EUR"], "amount": "1.00"},
        {"from": bob.accounts["USD"], "to": source, "amount": "1.00"},
        {"from": source, "to": 2**62, "amount": "1.00"},
        {"from": source, "to": target, "amount": 2.5, "idempotency_key": "k1"},
        {"from": source, "to": target, "amount": "2.50", "idempotency_key": "k1"},
        {"from": source, "to": target, "amount": "3.00", "idempotency_key": "k1"},
        "not an object",
        {"to": target, "amount": "1.00"},
    ]
    response = api.client.post(
        f"/users/{alice.id}/transfers/batch", json={"transfers": items}, headers=alice.auth
    )
    assert response.status_code == 202
    results = response.get_json()["results"]
    assert [r["status"] for r in results] == [202, 400, 400, 400, 404, 404, 202, 202, 422, 400, 400]
    codes = [r["error"]["code"] for r in results if r["status"] != 202]
    assert codes == [
        "invalid_amount",
        "same_account",
        "currency_mismatch",
        "account_not_found",
        "account_not_found",
        "idempotency_key_mismatch",
        "invalid_request",
        "invalid_request",
    ]
    first, keyed, replay = results[0]["transfer"], results[6]["transfer"], results[7]["transfer"]
    assert first["comment"] == "first"
    assert first["commission"] == "0.01"
    assert keyed["id"] == replay["id"]
    assert keyed["amount"] == "2.50"
    for transfer in (first, keyed):
        assert api.wait_final(alice, transfer["id"])["status"] == "settled"
    assert api.balance(bob, target) == "3.50"


def test_batch_body_must_be_a_list_of_1_to_1000_items(api: Api) -> None:
    alice = api.register()
    url = f"/users/{alice.id}/transfers/batch"
    item = {"from": alice.accounts["USD"], "to": alice.accounts["USD"], "amount": "1"}
    for body in (
        {},
        {"transfers": []},
        {"transfers": {}},
        {"transfers": "x"},
        [item],
        {"transfers": [item] * 1001},
    ):
        response = api.client.post(url, json=body, headers=alice.auth)
        assert response.status_code == 400, body
        assert response.get_json()["code"] == "invalid_request"


def test_batch_of_1000_is_accepted_and_settled(api: Api) -> None:
    alice, bob = api.funded("1000.00"), api.register()
    items = [{"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "0.50"}] * 1000
    response = api.client.post(
        f"/users/{alice.id}/transfers/batch", json={"transfers": items}, headers=alice.auth
    )
    assert response.status_code == 202
    ids = [r["transfer"]["id"] for r in response.get_json()["results"]]
    assert len(set(ids)) == 1000
    assert api.wait_final(alice, max(ids), timeout=60)["status"] in ("settled", "rejected")
    assert all(api.wait_final(alice, i)["status"] == "settled" for i in ids)
    assert api.balance(bob, bob.accounts["USD"]) == "500.00"
    assert api.balance(alice, alice.accounts["USD"]) == "490.00"


def test_batch_needs_the_path_owner(api: Api) -> None:
    alice, mallory = api.register(), api.register()
    item = {"from": alice.accounts["USD"], "to": mallory.accounts["USD"], "amount": "1"}
    response = api.client.post(
        f"/users/{alice.id}/transfers/batch", json={"transfers": [item]}, headers=mallory.auth
    )
    assert response.status_code == 403
    assert api.client.post(f"/users/{alice.id}/transfers/batch", json={}).status_code == 401
