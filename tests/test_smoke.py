from decimal import Decimal

from tests.conftest import SUPERUSER

USD_COMMISSION_ACCOUNT = 5  # seeded: the superuser's USD commission account


def test_transfer_settles_end_to_end(api) -> None:
    alice = api.funded("100.00")
    bob = api.register()
    commission_before = api.balance(SUPERUSER, USD_COMMISSION_ACCOUNT)
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "10.00")
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["status"] == "pending"
    assert body["commission"] == "0.10"
    final = api.wait_final(alice, body["id"])
    assert final["status"] == "settled", final
    assert api.balance(alice, alice.accounts["USD"]) == "89.90"
    assert api.balance(bob, bob.accounts["USD"]) == "10.00"
    commission_after = api.balance(SUPERUSER, USD_COMMISSION_ACCOUNT)
    assert Decimal(commission_after) - Decimal(commission_before) == Decimal("0.10")
