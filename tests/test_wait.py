"""Long polling: `?wait=` holds a pending transfer's answer until it is final."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from common import announcements, pubsub
from tests.conftest import Api, settlement_held
from web import long_poll
from web.long_poll import grace_slots, long_poll_slots


def _wait_in_thread(
    app: Any, member: Any, transfer_id: int, wait: float, held_s: float = 0.5
) -> tuple[Any, dict]:
    """A long poll in a thread, checked to be held for `held_s`."""
    result: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        response = app.test_client().get(
            f"/users/{member.id}/transfers/{transfer_id}?wait={wait}", headers=member.auth
        )
        result["elapsed"] = time.monotonic() - started
        result["body"] = response.get_json()
        result["headers"] = response.headers

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(held_s)
    assert waiter.is_alive(), "the request should be held while the transfer is pending"
    return waiter, result


def _answered_at_once_with_retry(api: Api, member: Any, transfer_id: int) -> Any:
    """A long poll that finds no slot free: answered at once, pending, told to retry."""
    started = time.monotonic()
    response = api.client.get(
        f"/users/{member.id}/transfers/{transfer_id}?wait=20", headers=member.auth
    )
    assert time.monotonic() - started < 2
    assert response.status_code == 200
    assert response.get_json()["status"] == "pending"
    assert response.headers["Retry-After"] == "1"
    return response


def test_wait_is_woken_by_the_settlement_not_by_its_timeout(api: Api, app: Any) -> None:
    alice, bob = api.funded("10.00", "EUR"), api.register()
    with settlement_held("EUR"):
        body = api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], "1.00").get_json()
        waiter, result = _wait_in_thread(app, alice, body["id"], 20, held_s=1.0)
    released_at = time.monotonic()
    waiter.join(timeout=15)
    assert not waiter.is_alive()
    assert result["body"]["status"] == "settled"
    assert 1.0 <= result["elapsed"] < 10
    assert time.monotonic() - released_at < 5


def test_wait_times_out_with_the_pending_transfer(api: Api) -> None:
    alice, bob = api.funded("10.00", "CNY"), api.register()
    with settlement_held("CNY"):
        body = api.transfer(alice, alice.accounts["CNY"], bob.accounts["CNY"], "1.00").get_json()
        started = time.monotonic()
        response = api.client.get(
            f"/users/{alice.id}/transfers/{body['id']}?wait=1.5", headers=alice.auth
        )
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.get_json()["status"] == "pending"
    assert 1.4 <= elapsed < 5


def test_wait_on_a_final_transfer_answers_at_once(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    body = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00").get_json()
    api.wait_final(alice, body["id"])
    started = time.monotonic()
    response = api.client.get(
        f"/users/{alice.id}/transfers/{body['id']}?wait=30", headers=alice.auth
    )
    assert response.get_json()["status"] == "settled"
    assert time.monotonic() - started < 1


def test_long_polls_leave_a_quarter_of_the_threads() -> None:
    assert [long_poll_slots(threads) for threads in (1, 2, 4, 16, 32)] == [0, 1, 3, 12, 24]
    # Short waits without a slot may take half of what is left, so at least one thread,
    # and at least half of the quarter, always stays for everything else.
    assert [grace_slots(threads) for threads in (1, 2, 4, 16, 32)] == [0, 0, 0, 2, 4]


def _set_slots(
    app: Any,
    monkeypatch: pytest.MonkeyPatch,
    held: threading.BoundedSemaphore,
    grace: threading.BoundedSemaphore,
) -> None:
    slots = app.extensions[long_poll.EXTENSION]
    monkeypatch.setattr(slots, "held", held)
    monkeypatch.setattr(slots, "grace", grace)


def test_a_long_poll_without_a_slot_answers_at_once(
    api: Api, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = threading.BoundedSemaphore(1)
    _set_slots(app, monkeypatch, slots, threading.BoundedSemaphore(0))
    alice, bob = api.funded("10.00", "EUR"), api.register()
    with settlement_held("EUR"):
        body = api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], "1.00").get_json()
        waiter, result = _wait_in_thread(app, alice, body["id"], 20)
        _answered_at_once_with_retry(api, alice, body["id"])
    waiter.join(timeout=15)
    assert result["body"]["status"] == "settled"
    # The held poll gave its slot back; a final transfer is answered with no Retry-After.
    assert slots.acquire(blocking=False)
    final = api.client.get(f"/users/{alice.id}/transfers/{body['id']}?wait=5", headers=alice.auth)
    assert final.get_json()["status"] == "settled"
    assert "Retry-After" not in final.headers
    slots.release()


def test_a_long_poll_without_a_slot_waits_a_moment_on_a_grace_slot(
    api: Api, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_slots(app, monkeypatch, threading.BoundedSemaphore(1), threading.BoundedSemaphore(1))
    # Long enough for a settlement on a slow machine; the moment is 0.25 s in service.
    monkeypatch.setattr(long_poll, "UNHELD_GRACE_S", 20.0)
    alice, bob = api.funded("10.00", "EUR"), api.register()
    with settlement_held("EUR"):
        body = api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], "1.00").get_json()
        held, _ = _wait_in_thread(app, alice, body["id"], 30)
        graced, graced_result = _wait_in_thread(app, alice, body["id"], 30)
        # Slot and grace slot both taken: the third answers at once.
        _answered_at_once_with_retry(api, alice, body["id"])
    for thread in (held, graced):
        thread.join(timeout=15)
        assert not thread.is_alive()
    assert graced_result["body"]["status"] == "settled"
    assert "Retry-After" not in graced_result["headers"]
    assert graced_result["elapsed"] < 20


@pytest.mark.parametrize("wait", ["-1", "31", "abc", "NaN", "inf", "1e1", ""])
def test_bad_wait_is_invalid_query(api: Api, wait: str) -> None:
    alice = api.register()
    response = api.client.get(f"/users/{alice.id}/transfers/1?wait={wait}", headers=alice.auth)
    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_query"


@pytest.mark.parametrize(
    ("amount", "status", "reason"),
    [("1.00", "settled", None), ("50.00", "rejected", "insufficient_funds")],
)
def test_a_woken_wait_answers_exactly_what_a_read_says(
    api: Api, app: Any, amount: str, status: str, reason: str | None
) -> None:
    # The woken request answers from the settlement's announcement, not from a read:
    # the answer must be the very transfer a read gives, to the microsecond.
    alice, bob = api.funded("10.00", "EUR"), api.register()
    with settlement_held("EUR"):
        body = api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], amount).get_json()
        waiter, result = _wait_in_thread(app, alice, body["id"], 20)
    waiter.join(timeout=15)
    assert not waiter.is_alive()
    assert result["elapsed"] < 10
    assert result["body"]["status"] == status
    assert result["body"]["reason"] == reason
    assert (result["body"]["settled_at"] is None) == (status != "settled")
    assert result["body"] == api.get_transfer(alice, body["id"])


def _forged(transfer_id: int) -> str:
    payload = json.dumps(
        {"settled_at": "2026-11-27T09:30:01+00:00", "final": [[transfer_id, "settled", None]]}
    )
    return "f" * 64 + payload


@pytest.mark.parametrize(
    "announce",
    # As for a transfer marked failed: the message names it, the database says how.
    # And a forgery: anyone who can publish on Redis could say "settled".
    [
        lambda transfer_id: announcements.announce_final([transfer_id]),
        lambda transfer_id: pubsub.publish(announcements.CHANNEL, _forged(transfer_id)),
    ],
    ids=["ids alone", "forged signature"],
)
def test_an_announcement_without_a_verified_outcome_makes_the_wait_read_again(
    api: Api, app: Any, announce: Callable[[int], None]
) -> None:
    alice, bob = api.funded("10.00", "CNY"), api.register()
    with settlement_held("CNY"):
        body = api.transfer(alice, alice.accounts["CNY"], bob.accounts["CNY"], "1.00").get_json()
        waiter, result = _wait_in_thread(app, alice, body["id"], 20)
        announce(body["id"])
        waiter.join(timeout=5)
        assert not waiter.is_alive(), "the announcement should have woken the request"
        # Still pending in the database (its settler waits for the lock): so it says.
        assert result["body"]["status"] == "pending"
        assert result["body"]["settled_at"] is None
        assert result["elapsed"] < 5
    assert api.wait_final(alice, body["id"])["status"] == "settled"


def _signed(payload: str, signature: str | None = None) -> bytes:
    return ((signature or announcements._signature(payload)) + payload).encode()


def test_announcements_are_parsed_both_ways() -> None:
    at = datetime(2026, 11, 27, 9, 30, 1, 123456, tzinfo=UTC)
    assert announcements.parse_announcement(b"7,8,x") == {7: None, 8: None}
    waiters = long_poll.Waiters(announcements.parse_announcement)
    settled, rejected, other = waiters.register(1), waiters.register(2), waiters.register(3)
    payload = json.dumps(
        {
            "settled_at": at.isoformat(),
            "final": [[1, "settled", None], [2, "rejected", "insufficient_funds"]],
        }
    )
    waiters.wake(_signed(payload))
    assert settled.wait(0)
    assert settled.final == announcements.Final("settled", None, at)
    assert rejected.wait(0)
    assert rejected.final == announcements.Final("rejected", "insufficient_funds", None)
    assert not other.wait(0)
    waiters.wake(b"3")
    assert other.wait(0)
    assert other.final is None


def test_an_announcement_that_does_not_verify_only_wakes() -> None:
    # Anyone who can publish on Redis could say "settled": without the signature of a
    # process holding SECRET_KEY, the woken request reads the transfer instead.
    payload = json.dumps(
        {"settled_at": "2026-11-27T09:30:01+00:00", "final": [[5, "settled", None]]}
    )
    for forged in (
        _signed(payload, "0" * 64),
        _signed(payload.replace("5", "6"), None)[:64] + payload.encode(),
    ):
        waiters = long_poll.Waiters(announcements.parse_announcement)
        waiter = waiters.register(5)
        waiters.wake(forged)
        assert waiter.wait(0)
        assert waiter.final is None


@pytest.mark.parametrize(
    "garbage", ["0" * 64 + "{not json", "0" * 64 + '{"final": 3}', "0" * 64 + "{}", ""]
)
def test_an_unreadable_announcement_wakes_nobody_and_breaks_nothing(garbage: str) -> None:
    waiters = long_poll.Waiters(announcements.parse_announcement)
    waiter = waiters.register(5)
    waiters.wake(garbage.encode())
    assert not waiter.wait(0)
