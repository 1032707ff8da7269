"""The API's doorbells are coalesced: a burst of accepted transfers rings once per currency."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from common import broker
from common.doorbells import Doorbells, marks
from tests.conftest import SUPERUSER, Api, settlement_held
from worker.app import app as worker_app


def test_a_burst_rings_once_per_currency() -> None:
    published: list[tuple[str, list[int]]] = []
    done = threading.Event()

    def publish(currency: str, ids: list[int]) -> None:
        published.append((currency, ids))
        done.set()

    bells = Doorbells(publish, delay_s=0.05)
    for transfer_id in range(200):
        bells.ring_soon("USD" if transfer_id % 2 else "EUR", [transfer_id])
    assert done.wait(5)
    time.sleep(0.2)
    assert sorted(currency for currency, _ in published) == ["EUR", "USD"]
    assert all(len(ids) <= Doorbells.MAX_IDS_LOGGED for _, ids in published)


def test_flush_rings_what_is_still_waiting() -> None:
    published: list[str] = []
    bells = Doorbells(lambda currency, ids: published.append(currency), delay_s=60)
    bells.ring_soon("CNY", [1])
    bells.flush()  # what atexit does when the process stops
    assert published == ["CNY"]


def test_a_failing_publish_does_not_stop_the_ringer() -> None:
    calls: list[str] = []

    def publish(currency: str, ids: list[int]) -> None:
        calls.append(currency)
        if len(calls) == 1:
            raise OSError("broker gone")

    bells = Doorbells(publish, delay_s=0.01)
    bells.ring_soon("USD", [1])
    time.sleep(0.3)
    bells.ring_soon("USD", [2])
    time.sleep(0.3)
    assert calls == ["USD", "USD"]


def test_transfers_accepted_in_a_burst_all_settle(api: Api) -> None:
    alice, bob = api.funded("100.00"), api.register()
    ids = [
        api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00").get_json()["id"]
        for _ in range(30)
    ]
    assert all(api.wait_final(alice, i)["status"] == "settled" for i in ids)
    assert api.balance(bob, bob.accounts["USD"]) == "30.00"


def test_marks_tell_the_settler_that_someone_rang_while_it_was_busy(redis_client) -> None:

    marks.leave("EUR")
    marks.clear("EUR")  # the settler took the lock: earlier rings are covered by its claim
    assert not marks.take("EUR")
    marks.leave("EUR")  # a ring while the settler holds the lock
    assert marks.take("EUR")  # so it claims once more before leaving
    assert not marks.take("EUR")


def test_a_steady_stream_rings_once_per_interval() -> None:
    published: list[float] = []
    bells = Doorbells(lambda currency, ids: published.append(time.monotonic()), interval_s=0.1)
    started = time.monotonic()
    while time.monotonic() - started < 0.55:
        bells.ring_soon("USD", [1])
        time.sleep(0.005)
    time.sleep(0.2)
    # About one ring per 100 ms over 0.55 s (plus the trailing one), not one per transfer.
    assert 2 <= len(published) <= 8
    gaps = [b - a for a, b in itertools.pairwise(published)]
    assert all(gap >= 0.09 for gap in gaps)


def test_the_api_publishes_nothing_while_a_settler_is_busy(redis_client) -> None:
    assert not marks.leave_unless_covered("GBP")  # nobody settles GBP: the API must publish
    marks.leave("GBP")  # that doorbell starts: no longer queued
    marks.clear("GBP")  # it took the lock and is about to claim: busy
    assert 0 < redis_client.ttl("remit:settling:GBP") <= marks.BUSY_TTL_S  # a dead one expires
    assert marks.leave_unless_covered("GBP")  # the API leaves its mark and publishes nothing
    assert marks.take("GBP")  # the settler's last look sees the mark: it claims again
    marks.clear("GBP")
    assert not marks.take("GBP")  # nothing new: it leaves, and says so first
    assert not marks.leave_unless_covered("GBP")  # so the next doorbell is published


def test_the_api_publishes_nothing_while_its_doorbell_is_queued(redis_client) -> None:
    assert not marks.leave_unless_covered("CHF")  # publish, and say "queued" first
    assert 0 < redis_client.ttl("remit:doorbell-queued:CHF") <= marks.QUEUED_TTL_S
    # Until that doorbell starts, every ring is covered by it (and leaves its mark).
    assert marks.leave_unless_covered("CHF")
    assert marks.leave_unless_covered("CHF")
    marks.leave("CHF")  # the doorbell starts: rings after this are not covered by it
    assert not marks.leave_unless_covered("CHF")
    marks.not_queued("CHF")  # that publish failed: the next ring publishes again
    assert not marks.leave_unless_covered("CHF")


def test_a_settler_that_fails_is_no_longer_busy(redis_client) -> None:
    marks.clear("JPY")
    marks.not_busy("JPY")
    assert not marks.leave_unless_covered("JPY")


def test_whoever_holds_the_lock_looks_again_before_letting_go(api: Api) -> None:
    """A settler whose next try finds the lock taken leaves at once, and leaves "busy"
    set: the holder is busy too, and rings meanwhile are covered by its last look. A
    holder that never looked again (the tests' settlement_held did not) stranded them:
    the next test's deposit waited for beat's sweep."""
    alice, bob = api.funded("10.00"), api.register()
    with settlement_held("USD"):
        marks.clear("USD")  # "busy", as that settler left it
        stranded = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00")
    deposit = api.deposit(bob.accounts["USD"], "1.00")
    assert api.wait_final(alice, stranded.get_json()["id"])["status"] == "settled"
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"


@pytest.mark.parametrize("app", [broker.producer, lambda: worker_app], ids=["producer", "worker"])
def test_kombu_reuses_one_redis_client_per_channel_and_pool(redis_client, app) -> None:
    with app().connection_for_write() as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()
        channel._pool = None  # as after a reconnect: a new pool gets a new client
        with channel.conn_or_acquire() as third:
            assert third is not first
            assert third.ping()


def test_the_producer_publishes_as_the_worker_expects() -> None:
    # The API sends tasks by name through its own app: broker, redelivery and publish
    # retries must be the worker's.
    producer = broker.producer()
    for name in (
        "broker_url",
        "task_serializer",
        "accept_content",
        "task_default_queue",
        "task_ignore_result",
        "broker_transport_options",
        "broker_connection_timeout",
        "task_publish_retry_policy",
    ):
        assert producer.conf[name] == worker_app.conf[name], name
    assert {broker.SETTLE, broker.SWEEP} <= set(worker_app.tasks)
