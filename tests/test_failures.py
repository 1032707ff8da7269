"""The failure lifecycle: a transfer that cannot be settled backs off, becomes `failed`
with a reason, is retried by beat inside its window, and can be requeued by an operator;
meanwhile the rest of its currency settles.

The fault is real: a PostgreSQL trigger makes the posting insert of chosen transfers fail
(the `poison` fixture, tests/conftest.py).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text

from common.audit import audit
from common.db import script_session
from common.doorbells import ring
from common.ledger import requeue_failed
from common.transfers import TransferRequest, submit_transfer
from tests.conftest import SUPERUSER, Api, settlement_held, sweep_until
from worker.tasks import sweep


def _row(transfer_id: int) -> Any:
    with script_session() as session:
        return session.execute(
            text("SELECT status, reason, attempts, last_error FROM transfers WHERE id = :id"),
            {"id": transfer_id},
        ).one()


def _submit_with_poisoned_middle(
    api: Api, poison: Any, currency: str
) -> tuple[Any, Any, list[int]]:
    alice, bob = api.funded("100.00", currency), api.register()
    source, target = alice.accounts[currency], bob.accounts[currency]
    # Hold back settlement by poisoning the next id before it exists: create it first
    # with the lock of a pending doorbell-less insert, then poison, then ring.
    ids = []
    with settlement_held(currency):
        for _ in range(5):
            response = api.transfer(alice, source, target, "1.00")
            assert response.status_code == 202
            ids.append(response.get_json()["id"])
        poison(ids[2])
    return alice, bob, ids


def test_a_poisoned_transfer_fails_alone_and_its_currency_keeps_settling(
    api: Api, poison: Any
) -> None:
    alice, bob, ids = _submit_with_poisoned_middle(api, poison, "EUR")
    healthy = [i for i in ids if i != ids[2]]
    assert all(api.wait_final(alice, i)["status"] == "settled" for i in healthy)
    assert api.balance(bob, bob.accounts["EUR"]) == "4.00"

    # Attempts back off (1 s, 2 s); beat's sweep rings when one is due; the third fails it.
    sweep_until(lambda: _row(ids[2]).status == "failed")
    failed = _row(ids[2])
    assert failed.reason == "settlement_error"
    assert failed.attempts == 3
    assert "poisoned transfer" in failed.last_error
    shown = api.get_transfer(alice, ids[2])
    assert shown["status"] == "failed"
    assert shown["reason"] == "settlement_error"
    assert shown["settled_at"] is None
    assert api.balance(bob, bob.accounts["EUR"]) == "4.00", "no money moved for it"
    with script_session() as session:
        assert audit(session) == []

    # Beat retries it once it is due (1 s in tests); cured, it settles.
    poison.cure(ids[2])
    sweep_until(lambda: _row(ids[2]).status == "settled")
    assert api.balance(bob, bob.accounts["EUR"]) == "5.00"


def test_failed_transfers_outside_their_window_wait_for_the_operator(api: Api, poison: Any) -> None:
    alice, bob, ids = _submit_with_poisoned_middle(api, poison, "CNY")
    sweep_until(lambda: _row(ids[2]).status == "failed")
    poison.cure(ids[2])
    with script_session() as session, session.begin():
        # Its retry window (a day by default) closed long ago.
        session.execute(
            text("UPDATE transfers SET created_at = now() - interval '2 days' WHERE id = :id"),
            {"id": ids[2]},
        )
    time.sleep(1.2)
    for _ in range(3):
        sweep.apply()
    time.sleep(0.5)
    assert _row(ids[2]).status == "failed"

    with script_session() as session, session.begin():
        requeued = requeue_failed(session, [ids[2], ids[0]])
    assert requeued == [(ids[2], "CNY")], "only failed transfers are requeued"
    ring("CNY")
    assert api.wait_final(alice, ids[2])["status"] == "settled"
    assert _row(ids[2]).attempts == 1, "the budget started over: one attempt, the one that settled"
    assert api.balance(bob, bob.accounts["CNY"]) == "5.00"
    with script_session() as session:
        assert audit(session) == []


def test_sweep_rings_for_transfers_whose_doorbell_was_lost(api: Api) -> None:

    alice, bob = api.funded("10.00"), api.register()
    with script_session() as session, session.begin():
        accepted = submit_transfer(
            session,
            alice.id,
            TransferRequest(alice.accounts["USD"], bob.accounts["USD"], "2.00"),
        )
    transfer_id = accepted.transfer.id  # committed, never rung
    time.sleep(1.5)  # older than SWEEP_PENDING_AFTER
    assert api.get_transfer(alice, transfer_id)["status"] == "pending"
    assert sweep.apply().get().get("USD", 0) >= 1
    assert api.wait_final(SUPERUSER, transfer_id)["status"] == "settled"
