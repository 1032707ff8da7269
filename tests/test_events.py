"""Events: written with the outcome, fanned out to webhooks, read back as the API shows them.

Against the real thing: settlement by the real worker, faults by a PostgreSQL trigger
(`poison`), webhooks inserted as rows (their routes are another module's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery.signals import after_task_publish
from sqlalchemy import text

from common import broker
from common.currencies import all_currencies
from common.db import script_session
from common.doorbells import ring
from common.events import event_json
from common.ledger import settle_batch
from common.transfers import TransferRequest, submit_transfer
from tests.conftest import SUPERUSER, Api, Member
from worker.tasks import sweep

# --- helpers ------------------------------------------------------------------------------


def fetch(sql: str, **params: Any) -> list[Any]:
    with script_session() as session, session.begin():
        return list(session.execute(text(sql), params).all())


def events_of(*transfer_ids: int) -> list[tuple[int, str, int]]:
    """(user_id, type, transfer_id) of the transfers' events, in id order."""
    rows = fetch(
        "SELECT user_id, type, transfer_id FROM events WHERE transfer_id = ANY(:ids) ORDER BY id",
        ids=list(transfer_ids),
    )
    return [tuple(row) for row in rows]


def event_ids(transfer_id: int, event_type: str) -> list[int]:
    rows = fetch(
        "SELECT id FROM events WHERE transfer_id = :id AND type = :type ORDER BY id",
        id=transfer_id,
        type=event_type,
    )
    return [row.id for row in rows]


def add_webhook(user_id: int, events: list[str], *, enabled: bool = True) -> int:
    with script_session() as session, session.begin():
        return session.execute(
            text(
                "INSERT INTO webhooks (user_id, url, events, secret, enabled) "
                "VALUES (:user_id, 'http://127.0.0.1:9/hook', :events, 'whsec_dGVzdA==', :enabled) "
                "RETURNING id"
            ),
            {"user_id": user_id, "events": events, "enabled": enabled},
        ).scalar_one()


def submit_without_doorbell(member: Member, source: int, target: int, amount: str) -> int:
    with script_session() as session, session.begin():
        accepted = submit_transfer(session, member.id, TransferRequest(source, target, amount))
        return accepted.transfer.id


def _row(transfer_id: int) -> Any:
    return fetch("SELECT status FROM transfers WHERE id = :id", id=transfer_id)[0]


def _sweep_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        sweep.apply()
        time.sleep(0.5)


@pytest.fixture
def published() -> Iterator[list[tuple[str, Any, str | None]]]:
    """(task name, args, queue) of every task this process publishes meanwhile; the
    worker runs in this process (threads), so its publishes are seen too."""
    seen: list[tuple[str, Any, str | None]] = []
    lock = threading.Lock()

    def on_publish(sender: str | None = None, body: Any = None, **kwargs: Any) -> None:
        with lock:
            seen.append((str(sender), body[0], kwargs.get("routing_key")))

    after_task_publish.connect(on_publish, weak=False)
    yield seen
    after_task_publish.disconnect(on_publish)


# --- written with the outcome -------------------------------------------------------------


def test_a_settled_transfer_tells_the_payer_and_the_payee(api: Api) -> None:
    alice, bob = api.funded("50.00"), api.register()
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "10.00")
    transfer = api.wait_final(alice, response.get_json()["id"])
    assert transfer["status"] == "settled"
    assert events_of(transfer["id"]) == [
        (alice.id, "transfer.settled", transfer["id"]),
        (bob.id, "transfer.received", transfer["id"]),
    ]


def test_a_deposit_tells_the_superuser_as_payer_and_the_payee(api: Api) -> None:
    alice = api.register()
    deposit = api.deposit(alice.accounts["EUR"], "5.00")
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    assert events_of(deposit["id"]) == [
        (SUPERUSER.id, "transfer.settled", deposit["id"]),
        (alice.id, "transfer.received", deposit["id"]),
    ]


def test_a_rejected_transfer_tells_only_the_payer(api: Api) -> None:
    alice, bob = api.register(), api.register()
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00")
    transfer = api.wait_final(alice, response.get_json()["id"])
    assert transfer["status"] == "rejected"
    assert events_of(transfer["id"]) == [(alice.id, "transfer.rejected", transfer["id"])]


def test_no_received_event_between_one_users_own_accounts(api: Api) -> None:
    alice = api.funded("20.00")
    opened = api.client.post(f"/users/{alice.id}/accounts/USD", headers=alice.auth)
    savings = opened.get_json()["id"]
    response = api.transfer(alice, alice.accounts["USD"], savings, "3.00")
    transfer = api.wait_final(alice, response.get_json()["id"])
    assert transfer["status"] == "settled"
    assert events_of(transfer["id"]) == [(alice.id, "transfer.settled", transfer["id"])]


def test_events_are_written_in_the_batchs_transaction_and_vanish_with_its_rollback(
    api: Api,
) -> None:
    alice, bob = api.funded("30.00", "CNY"), api.register()
    transfer_id = submit_without_doorbell(alice, alice.accounts["CNY"], bob.accounts["CNY"], "2.00")
    cny = next(c for c in all_currencies_now() if c.code == "CNY")
    deadline = time.monotonic() + 30
    with script_session() as session:
        while True:
            session.begin()
            result = settle_batch(session, "CNY", 1000, cny.commission_account_id)
            if result.claimed is not None:
                break
            session.rollback()  # another settler holds CNY: try again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        inside = session.execute(
            text("SELECT type FROM events WHERE transfer_id = :id ORDER BY id"), {"id": transfer_id}
        ).scalars()
        assert list(inside) == ["transfer.settled", "transfer.received"]
        session.rollback()
    assert events_of(transfer_id) == []
    assert _row(transfer_id).status == "pending"

    ring("CNY")
    assert api.wait_final(alice, transfer_id)["status"] == "settled"
    assert events_of(transfer_id) == [
        (alice.id, "transfer.settled", transfer_id),
        (bob.id, "transfer.received", transfer_id),
    ]


def all_currencies_now() -> list[Any]:
    with script_session() as session, session.begin():
        return all_currencies(session)


def test_a_transfer_that_fails_then_settles_keeps_both_events(api: Api, poison: Any) -> None:
    alice, bob = api.funded("40.00", "EUR"), api.register()
    ids = []
    # Poisoned before the worker can see it: accepted under the currency's lock.
    with script_session() as holder:
        holder.execute(text("SELECT pg_advisory_lock(7301, hashtext('EUR'))"))
        try:
            response = api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], "4.00")
            ids.append(response.get_json()["id"])
            poison(ids[0])
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(7301, hashtext('EUR'))"))
            holder.commit()
    ring("EUR")
    transfer_id = ids[0]
    _sweep_until(lambda: _row(transfer_id).status == "failed")
    assert events_of(transfer_id) == [(alice.id, "transfer.failed", transfer_id)]
    failed = api.get_transfer(alice, transfer_id)
    [failed_event] = event_ids(transfer_id, "transfer.failed")
    assert event_json_now(failed_event)["data"] == failed

    poison.cure(transfer_id)
    _sweep_until(lambda: _row(transfer_id).status == "settled")
    assert events_of(transfer_id) == [
        (alice.id, "transfer.failed", transfer_id),
        (alice.id, "transfer.settled", transfer_id),
        (bob.id, "transfer.received", transfer_id),
    ]
    # Read after it settled, the failure still shows the transfer as it was then.
    assert event_json_now(failed_event)["data"] == failed
    settled = api.get_transfer(alice, transfer_id)
    [settled_event] = event_ids(transfer_id, "transfer.settled")
    [received_event] = event_ids(transfer_id, "transfer.received")
    assert event_json_now(settled_event)["data"] == settled
    assert event_json_now(received_event)["data"] == settled


def event_json_now(event_id: int) -> dict[str, Any]:
    with script_session() as session, session.begin():
        body = event_json(session, event_id)
    assert body is not None
    return body


# --- the event object -----------------------------------------------------------------------


def test_event_json_is_the_event_object_with_the_transfer_as_get_shows_it(api: Api) -> None:
    alice, bob = api.funded("50.00"), api.register()
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "7.25")
    transfer = api.wait_final(alice, response.get_json()["id"])
    [event_id] = event_ids(transfer["id"], "transfer.settled")
    body = event_json_now(event_id)
    assert body.keys() == {"id", "type", "created_at", "data"}
    assert body["id"] == str(event_id)
    assert body["type"] == "transfer.settled"
    assert body["created_at"].endswith("Z")
    assert body["created_at"] == transfer["settled_at"], "written by the settling statement"
    assert body["data"] == transfer
    assert body["data"] == api.get_transfer(bob, transfer["id"])


def test_event_json_of_no_event_is_none() -> None:
    with script_session() as session, session.begin():
        assert event_json(session, 2**62) is None


# --- webhook fan-out ------------------------------------------------------------------------


def test_deliveries_are_written_for_matching_enabled_webhooks_only(
    api: Api, published: list[tuple[str, Any, str | None]]
) -> None:
    alice, bob, carol = api.funded("60.00"), api.register(), api.register()
    everything = add_webhook(alice.id, ["*"])
    settled_only = add_webhook(alice.id, ["transfer.settled", "transfer.failed"])
    add_webhook(alice.id, ["transfer.received"])  # alice receives nothing here
    add_webhook(alice.id, ["*"], enabled=False)
    bobs = add_webhook(bob.id, ["transfer.received"])
    add_webhook(carol.id, ["*"])  # not concerned

    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "5.00")
    transfer = api.wait_final(alice, response.get_json()["id"])
    assert transfer["status"] == "settled"
    [settled] = event_ids(transfer["id"], "transfer.settled")
    [received] = event_ids(transfer["id"], "transfer.received")
    rows = fetch(
        "SELECT d.id, d.webhook_id, d.event_id, d.state, d.attempts, d.locked_until,"
        " d.deadline_at - e.created_at AS window, d.next_attempt_at - e.created_at AS wait"
        " FROM webhook_deliveries d JOIN events e ON e.id = d.event_id"
        " WHERE d.event_id = ANY(:ids) ORDER BY d.id",
        ids=[settled, received],
    )
    assert [(row.webhook_id, row.event_id) for row in rows] == [
        (everything, settled),
        (settled_only, settled),
        (bobs, received),
    ]
    for row in rows:
        assert (row.state, row.attempts, row.locked_until) == ("pending", 0, None)
        assert row.window == timedelta(hours=24)
        assert row.wait == timedelta(0), "due at once"

    # After commit, one delivery task per row, on the webhooks' queue.
    deadline = time.monotonic() + 10
    expected = {(broker.DELIVER, (row.id,), broker.WEBHOOKS_QUEUE) for row in rows}
    while not expected <= {(n, tuple(args), q) for n, args, q in published if n == broker.DELIVER}:
        assert time.monotonic() < deadline, published
        time.sleep(0.05)


def test_no_deliveries_without_webhooks(
    api: Api, published: list[tuple[str, Any, str | None]]
) -> None:
    alice, bob = api.funded("10.00", "CNY"), api.register()
    response = api.transfer(alice, alice.accounts["CNY"], bob.accounts["CNY"], "1.00")
    transfer = api.wait_final(alice, response.get_json()["id"])
    ids = event_ids(transfer["id"], "transfer.settled") + event_ids(
        transfer["id"], "transfer.received"
    )
    assert len(ids) == 2
    assert fetch("SELECT id FROM webhook_deliveries WHERE event_id = ANY(:ids)", ids=ids) == []
    assert not [p for p in published if p[0] == broker.DELIVER]


def test_a_failure_fans_out_too(api: Api, poison: Any) -> None:
    alice, bob = api.funded("40.00", "USD"), api.register()
    hook = add_webhook(alice.id, ["transfer.failed"])
    ids = []
    with script_session() as holder:
        holder.execute(text("SELECT pg_advisory_lock(7301, hashtext('USD'))"))
        try:
            response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "4.00")
            ids.append(response.get_json()["id"])
            poison(ids[0])
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(7301, hashtext('USD'))"))
            holder.commit()
    ring("USD")
    _sweep_until(lambda: _row(ids[0]).status == "failed")
    [failed] = event_ids(ids[0], "transfer.failed")
    rows = fetch("SELECT webhook_id FROM webhook_deliveries WHERE event_id = :id", id=failed)
    assert [row.webhook_id for row in rows] == [hook]
    poison.cure(ids[0])
    _sweep_until(lambda: _row(ids[0]).status == "settled")
