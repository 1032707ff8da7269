"""Events: written with the outcome, fanned out to webhooks, read back as the API shows them.

Against the real thing: settlement by the real worker, faults by a PostgreSQL trigger
(`poison`), webhooks inserted as rows (their routes are another module's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery.signals import after_task_publish
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from common import broker
from common.currencies import all_currencies
from common.db import script_session
from common.doorbells import ring
from common.events import event_json
from common.ledger import settle_batch
from common.transfers import TransferRequest, submit_transfer
from tests.conftest import (
    SUPERUSER,
    Api,
    Member,
    assert_problem,
    basic_auth,
    next_page,
    settlement_held,
    sweep_until,
)
from web.fields import EVENT_TYPES

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


def _failed_transfer(api: Api, poison: Any, payer: Any, payee: Any, currency: str) -> int:
    """A transfer of 4.00 that settlement keeps failing until it is `failed`: poisoned
    before the worker can see it (accepted under the currency's lock)."""
    with settlement_held(currency):
        response = api.transfer(payer, payer.accounts[currency], payee.accounts[currency], "4.00")
        transfer_id: int = response.get_json()["id"]
        poison(transfer_id)
    sweep_until(lambda: _row(transfer_id).status == "failed")
    return transfer_id


def test_a_transfer_that_fails_then_settles_keeps_both_events(api: Api, poison: Any) -> None:
    alice, bob = api.funded("40.00", "EUR"), api.register()
    transfer_id = _failed_transfer(api, poison, alice, bob, "EUR")
    assert events_of(transfer_id) == [(alice.id, "transfer.failed", transfer_id)]
    failed = api.get_transfer(alice, transfer_id)
    [failed_event] = event_ids(transfer_id, "transfer.failed")
    assert event_json_now(failed_event)["data"] == failed

    poison.cure(transfer_id)
    sweep_until(lambda: _row(transfer_id).status == "settled")
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


def test_batches_that_roll_back_leave_no_events_behind(api: Api, poison: Any) -> None:
    """A poisoned transfer in the middle fails its batch, which is halved and retried until
    the poisoned one stands alone: every rolled-back attempt wrote events that vanished."""
    alice, bob = api.funded("50.00", "CNY"), api.register()
    ids = []
    with settlement_held("CNY"):
        for _ in range(5):
            response = api.transfer(alice, alice.accounts["CNY"], bob.accounts["CNY"], "1.00")
            ids.append(response.get_json()["id"])
        poison(ids[2])
    healthy = [i for i in ids if i != ids[2]]
    assert all(api.wait_final(alice, i)["status"] == "settled" for i in healthy)
    sweep_until(lambda: _row(ids[2]).status == "failed")
    # Exactly one set of events per outcome, whichever batches settled what.
    by_transfer = sorted(events_of(*ids), key=lambda e: (e[2], e[1] == "transfer.received"))
    assert by_transfer == [
        event
        for i in ids
        for event in (
            [(alice.id, "transfer.failed", i)]
            if i == ids[2]
            else [(alice.id, "transfer.settled", i), (bob.id, "transfer.received", i)]
        )
    ]


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
        assert row.window == timedelta(hours=24)
        # Written pending and due at once. A webhook worker started by an earlier test
        # of this process may already have leased or tried it.
        if row.attempts == 0:
            assert row.state == "pending"
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
    transfer_id = _failed_transfer(api, poison, alice, bob, "USD")
    [failed] = event_ids(transfer_id, "transfer.failed")
    rows = fetch("SELECT webhook_id FROM webhook_deliveries WHERE event_id = :id", id=failed)
    assert [row.webhook_id for row in rows] == [hook]
    poison.cure(transfer_id)
    sweep_until(lambda: _row(transfer_id).status == "settled")


# --- the feed -----------------------------------------------------------------------------


def feed(api: Api, member: Member, query: str = "", *, auth: Member | None = None) -> Any:
    return api.client.get(f"/users/{member.id}/events{query}", headers=(auth or member).auth)


def feed_once_settled(api: Api, member: Member, count: int, query: str = "") -> list[dict]:
    """The feed once it shows `count` events. The feed holds back events while any older
    transaction of the server still runs (other databases' too), so it may lag a moment."""
    deadline = time.monotonic() + 60
    while True:
        response = feed(api, member, query + ("&" if query else "?") + "limit=500")
        assert response.status_code == 200, response.get_json()
        items = response.get_json()
        if len(items) >= count:
            return items
        assert time.monotonic() < deadline, items
        time.sleep(0.1)


def test_the_feed_lists_a_users_events_in_commit_order_as_get_shows_them(api: Api) -> None:
    alice, bob = api.funded("50.00"), api.register()
    first = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00").get_json()
    assert api.wait_final(alice, first["id"])["status"] == "settled"
    second = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "99.00").get_json()
    assert api.wait_final(alice, second["id"])["status"] == "rejected"

    items = feed_once_settled(api, alice, 3)
    assert [(item["type"], item["data"]["id"]) for item in items] == [
        ("transfer.received", items[0]["data"]["id"]),  # the deposit that funded her
        ("transfer.settled", first["id"]),
        ("transfer.rejected", second["id"]),
    ]
    for item in items:
        assert item.keys() == {"id", "type", "created_at", "data"}
        assert isinstance(item["id"], str)
        assert item["data"] == api.get_transfer(alice, item["data"]["id"])
        assert event_json_now(int(item["id"])) == item, "the feed and webhooks say the same"
    assert [item["type"] for item in feed_once_settled(api, bob, 1)] == ["transfer.received"]
    response = feed(api, alice)
    assert response.mimetype == "application/json"
    assert "Link" not in response.headers


def _events_for(api: Api, count: int) -> tuple[Member, list[dict]]:
    """A user with `count` + 1 events: a deposit received, then settled and rejected payments."""
    alice, bob = api.funded("10.00", "EUR"), api.register()
    ids = [
        api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], amount).get_json()["id"]
        for amount in ("1.00", "50.00") * (count // 2) + ("1.00",) * (count % 2)
    ]
    for transfer_id in ids:
        assert api.wait_final(alice, transfer_id)["status"] != "pending"
    return alice, feed_once_settled(api, alice, count + 1)


def _pages(api: Api, member: Member, query: str) -> list[list[dict]]:
    pages = []
    path: str | None = f"/users/{member.id}/events{query}"
    while path is not None:
        response = api.client.get(path, headers=member.auth)
        assert response.status_code == 200, response.get_json()
        pages.append(response.get_json())
        assert len(pages) < 50
        path = next_page(response)
    return pages


def test_the_feed_pages_with_after_and_link(api: Api) -> None:
    alice, everything = _events_for(api, 6)
    pages = _pages(api, alice, "?limit=3")
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [item for page in pages for item in page] == everything
    # `after` alone: everything after that event.
    after = feed(api, alice, f"?after={everything[2]['id']}").get_json()
    assert after == everything[3:]
    assert feed(api, alice, f"?after={everything[-1]['id']}").get_json() == []
    # A full last page has no Link: nothing more exists yet.
    response = feed(api, alice, f"?limit={len(everything)}")
    assert response.get_json() == everything
    assert "Link" not in response.headers
    response = feed(api, alice, f"?limit={len(everything) - 1}")
    assert next_page(response) is not None


def test_the_feed_filters_by_type_and_the_link_keeps_the_filter(api: Api) -> None:
    alice, everything = _events_for(api, 5)
    rejected = [item for item in everything if item["type"] == "transfer.rejected"]
    assert len(rejected) == 2
    pages = _pages(api, alice, "?type=transfer.rejected&limit=1")
    assert [item for page in pages for item in page] == rejected
    assert feed(api, alice, "?type=hold.held").get_json() == []
    after = feed(api, alice, f"?type=transfer.settled&after={rejected[0]['id']}").get_json()
    assert after == [
        item
        for item in everything
        if item["type"] == "transfer.settled" and int(item["id"]) > int(rejected[0]["id"])
    ]


@given(limit=st.integers(1, 8), event_type=st.sampled_from([None, *EVENT_TYPES[:4]]))
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_paging_of_the_feed_lists_each_event_once_in_order(
    api: Api, feed_of_seven: tuple[Member, list[dict]], limit: int, event_type: str | None
) -> None:
    member, everything = feed_of_seven
    query = f"?limit={limit}" + (f"&type={event_type}" if event_type else "")
    pages = _pages(api, member, query)
    wanted = [item for item in everything if event_type in (None, item["type"])]
    assert [item for page in pages for item in page] == wanted
    assert all(len(page) == limit for page in pages[:-1])
    assert len(pages) == max(1, -(-len(wanted) // limit))


@pytest.fixture(scope="module")
def feed_of_seven(app: Any, settlement_worker: Any) -> tuple[Member, list[dict]]:
    return _events_for(Api(app.test_client()), 6)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?limit=0", "limit"),
        ("?limit=501", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=1.5", "limit"),
        ("?limit=%205", "limit"),
        ("?limit=", "limit"),
        ("?limit=99999", "limit"),
        ("?after=abc", "after"),
        ("?after=-1", "after"),
        ("?after=", "after"),
        ("?after=1e3", "after"),
        ("?after=99999999999999999999", "after"),
        ("?after=%00", "after"),
        ("?type=transfer", "type"),
        ("?type=", "type"),
        ("?type=TRANSFER.SETTLED", "type"),
        ("?type=transfer.settled%00", "type"),
    ],
)
def test_bad_queries_are_invalid_query(api: Api, query: str, field: str) -> None:
    alice = api.register()
    body = assert_problem(feed(api, alice, query), 400, "invalid_query")
    assert body["detail"].startswith(f"{field}:"), body


def test_after_must_be_one_of_the_users_own_events(api: Api) -> None:
    alice, bob = api.funded("5.00"), api.register()
    [bobs_first] = feed_once_settled(api, api.funded("5.00"), 1)
    assert_problem(feed(api, alice, f"?after={bobs_first['id']}"), 400, "invalid_query")
    assert_problem(feed(api, bob, f"?after={2**62}"), 400, "invalid_query")
    assert_problem(feed(api, bob, "?after=0"), 400, "invalid_query")


def test_the_feed_follows_the_path_rules(api: Api) -> None:
    alice, mallory = api.funded("5.00"), api.register()
    [received] = feed_once_settled(api, alice, 1)
    # Only its user, or the superuser reading.
    assert_problem(feed(api, alice, auth=mallory), 403, "forbidden")
    as_superuser = feed(api, alice, auth=SUPERUSER)
    assert as_superuser.status_code == 200
    assert as_superuser.get_json() == [received]
    missing = api.client.get(f"/users/{2**62}/events", headers=SUPERUSER.auth)
    assert_problem(missing, 404, "user_not_found")
    assert_problem(api.client.get(f"/users/{2**62}/events", headers=alice.auth), 403, "forbidden")
    # No credentials, wrong ones, a malformed header: 401 with the challenge.
    for headers in ({}, basic_auth(alice.username, "wrong password"), {"Authorization": "Basic !"}):
        response = api.client.get(f"/users/{alice.id}/events", headers=headers)
        assert_problem(response, 401, "unauthorized")
        assert "Basic" in response.headers["WWW-Authenticate"]
    # Other methods are not routes.
    response = api.client.post(f"/users/{alice.id}/events", headers=alice.auth)
    assert_problem(response, 405, "method_not_allowed")


def test_the_superusers_own_feed_tells_of_deposits(api: Api) -> None:
    alice = api.register()
    deposit = api.deposit(alice.accounts["CNY"], "3.00")
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    response = feed(api, SUPERUSER, "?type=transfer.settled&limit=5")
    assert response.status_code == 200
    assert all(item["data"]["from_user_id"] == SUPERUSER.id for item in response.get_json())


# --- commit order -----------------------------------------------------------------------------


def test_an_event_committed_later_is_never_skipped_by_a_client_paging_with_after(
    api: Api,
) -> None:
    """Two transactions write events for one user: the first takes the lower id and stays
    open while the second commits. The feed shows neither until the first commits, so a
    client that paged meanwhile finds both after its last id, in (txid, id) order."""
    alice = api.funded("5.00", "USD")
    [seen] = feed_once_settled(api, alice, 1)
    transfer_id = seen["data"]["id"]
    insert = text(
        "INSERT INTO events (user_id, type, transfer_id) "
        "VALUES (:user_id, 'transfer.settled', :transfer_id) RETURNING id, txid"
    )
    params = {"user_id": alice.id, "transfer_id": transfer_id}
    with script_session() as first, script_session() as second:
        first.begin()
        low = first.execute(insert, params).one()
        second.begin()
        high = second.execute(insert, params).one()
        assert (low.id, low.txid) < (high.id, high.txid)
        second.commit()
        # The second is committed, but an older transaction that may still write is open.
        for _ in range(5):
            assert feed(api, alice, f"?after={seen['id']}").get_json() == []
            assert [item["id"] for item in feed(api, alice).get_json()] == [seen["id"]]
            time.sleep(0.05)
        first.commit()
    later = feed_once_settled(api, alice, 3)
    assert [item["id"] for item in later] == [seen["id"], str(low.id), str(high.id)]
    assert [item["id"] for item in feed(api, alice, f"?after={seen['id']}").get_json()] == [
        str(low.id),
        str(high.id),
    ]


def test_the_feed_orders_by_transaction_not_by_id(api: Api) -> None:
    """The transaction that started first (lower txid) writes its event last (higher id):
    the feed still lists it first, once both committed."""
    alice = api.funded("5.00", "EUR")
    [seen] = feed_once_settled(api, alice, 1)
    insert = text(
        "INSERT INTO events (user_id, type, transfer_id) "
        "VALUES (:user_id, 'transfer.rejected', :transfer_id) RETURNING id, txid"
    )
    params = {"user_id": alice.id, "transfer_id": seen["data"]["id"]}
    with script_session() as early, script_session() as late:
        early.begin()
        early.execute(text("SELECT pg_current_xact_id()"))  # takes its txid now
        late.begin()
        first_id = late.execute(insert, params).one()
        second_id = early.execute(insert, params).one()
        assert first_id.id < second_id.id
        assert second_id.txid < first_id.txid
        late.commit()
        assert feed(api, alice, f"?after={seen['id']}").get_json() == []
        early.commit()
    later = feed_once_settled(api, alice, 3)
    assert [item["id"] for item in later[1:]] == [str(second_id.id), str(first_id.id)]


def test_an_unreachable_broker_only_costs_a_log_line(tmp_path: Any) -> None:
    """After commit the deliveries are published best effort: with the broker down the
    first publish gives up after its retries, the rest are not tried, nothing raises
    (a real process, a real refused connection)."""
    script = (
        "import logging, time\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from common.events import publish_deliveries\n"
        "started = time.monotonic()\n"
        "publish_deliveries(list(range(1, 1001)))\n"
        "print(f'returned after {time.monotonic() - started:.1f} s')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1000 webhook deliveries not published (the sweep will)" in result.stderr
    seconds = float(result.stdout.split()[2])
    assert seconds < 10, "one publish's retries, not a thousand"
