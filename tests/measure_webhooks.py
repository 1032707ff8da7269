"""Measurements behind docs/decisions/0033 (webhook deliveries). Not part of the suite
(its name does not start with test_); run it on purpose, printing its numbers:

    ./run.sh test tests/measure_webhooks.py -s -p no:cacheprovider

- throughput: 1000 due deliveries to a receiver on loopback that answers at once;
- isolation: settlement latency of 30 transfers, before and while 200 deliveries wait
  on a receiver that takes 1.9 s per request;
- the sweep's cost with 100,000 pending deliveries not yet due, and 100,000 due.
"""

from __future__ import annotations

import statistics
import time

from sqlalchemy import text

from common import broker
from common.db import script_session, settlement_transaction
from common.webhooks import sweep_deliveries
from tests.test_webhooks import register_webhook
from tests.webhook_receiver import Answer, Receiver

# n events of one user (about one transfer) and one delivery each to one webhook.
_EVENTS = text(
    "WITH ev AS (INSERT INTO events (user_id, type, transfer_id)"
    " SELECT :user_id, 'transfer.settled', :transfer_id FROM generate_series(1, :n)"
    " RETURNING id, created_at)"
    " INSERT INTO webhook_deliveries (webhook_id, event_id, deadline_at, next_attempt_at)"
    " SELECT :webhook_id, ev.id, ev.created_at + interval '24 hours', now() + :due"
    " FROM ev RETURNING id"
)


def _deliveries(api, member, webhook, n: int, due: str = "0 s") -> list[int]:
    # Events about a real transfer (a deposit), or their bodies could not be rendered.
    deposit = api.deposit(member.accounts["USD"], "1.00")
    values = {
        "user_id": member.id,
        "transfer_id": deposit["id"],
        "n": n,
        "webhook_id": webhook["id"],
        "due": due,
    }
    with script_session() as session, session.begin():
        ids = session.execute(_EVENTS, values).scalars().all()
        session.execute(text("ANALYZE webhook_deliveries"))
    return list(ids)


def _publish(ids: list[int]) -> None:
    for delivery_id in ids:
        broker.send_task(broker.DELIVER, [delivery_id], queue=broker.WEBHOOKS_QUEUE)


def _delivered(webhook) -> int:
    with script_session() as session:
        return session.execute(
            text(
                "SELECT count(*) FROM webhook_deliveries"
                " WHERE webhook_id = :w AND state = 'delivered'"
            ),
            {"w": webhook["id"]},
        ).scalar_one()


def _retire(webhook) -> None:
    with script_session() as session, session.begin():
        session.execute(
            text(
                "UPDATE webhook_deliveries SET state = 'failed'"
                " WHERE webhook_id = :w AND state = 'pending'"
            ),
            {"w": webhook["id"]},
        )


def test_throughput(api, webhook_worker, settings) -> None:
    receiver = Receiver()
    member = api.register()
    webhook = register_webhook(api, member, receiver)
    n = 1000
    ids = _deliveries(api, member, webhook, n)
    started = time.monotonic()
    _publish(ids)
    deadline = time.monotonic() + 120
    while _delivered(webhook) < n:
        assert time.monotonic() < deadline, f"{_delivered(webhook)} of {n} delivered"
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    print(
        f"\nthroughput: {n} deliveries in {elapsed:.2f} s = {n / elapsed:.0f}/s "
        f"({settings.webhook_concurrency} threads)"
    )
    receiver.stop()


def _settlement_latency(api, payer, payee, count: int = 30) -> tuple[float, float]:
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        response = api.transfer(payer, payer.accounts["USD"], payee.accounts["USD"], "0.01")
        api.wait_final(payer, response.get_json()["id"])
        latencies.append(time.monotonic() - started)
    return statistics.median(latencies), max(latencies)


def test_slow_receivers_do_not_hold_settlement(api, webhook_worker) -> None:
    payer, payee = api.funded("100.00", "USD"), api.register()
    before = _settlement_latency(api, payer, payee)
    receiver = Receiver()
    receiver.default = Answer(204, delay=1.9)
    member = api.register()
    webhook = register_webhook(api, member, receiver)
    _publish(_deliveries(api, member, webhook, 200))
    time.sleep(1)
    during = _settlement_latency(api, payer, payee)
    print(
        f"\nsettlement latency, median / max: {before[0] * 1000:.0f} / {before[1] * 1000:.0f} ms "
        f"alone, {during[0] * 1000:.0f} / {during[1] * 1000:.0f} ms with 200 slow deliveries "
        f"queued ({_delivered(webhook)} delivered meanwhile)"
    )
    receiver.stop()
    _retire(webhook)


def test_sweep_cost(api) -> None:
    receiver = Receiver()
    for due, label in (("1 hour", "not yet due"), ("-1 minute", "due")):
        member = api.register()
        webhook = register_webhook(api, member, receiver)
        _deliveries(api, member, webhook, 100_000, due)
        timings = []
        for _ in range(5):
            started = time.monotonic()
            _, leased = settlement_transaction(lambda session: sweep_deliveries(session, 60))
            timings.append(time.monotonic() - started)
        print(
            f"\nsweep with 100,000 pending deliveries {label}: median "
            f"{statistics.median(timings) * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms "
            f"(leased {len(leased)} per sweep)"
        )
        _retire(webhook)
    receiver.stop()
