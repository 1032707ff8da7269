"""Nothing lost, nothing twice, under faults (invariants 4-6 of docs/architecture.md).

The real processes (gunicorn, two Celery worker nodes, beat) run against a throwaway
PostgreSQL and Redis. About a hundred funded users' clients submit a few thousand
transfers over keep-alive HTTP, re-sending some with the same Idempotency-Key, while
workers are SIGKILLed mid-batch, SIGSTOPped and SIGTERMed, Redis is flushed and
restarted, every database connection is terminated, PostgreSQL restarts, and doorbells
are published twice. Then, once the system drains, the ledger must be exactly what the
accepted transfers say.

Beside plain transfers the clients refund part of what they received, pay out, and place
holds that they capture (in part or whole) or void, or that expire after a minute, in the
middle of the faults; the ledger must account for all of it (held amounts equal to the
live reservations, refund totals within their transfers' amounts, one capture per hold).

Every user has a webhook (registered before any of their transfers) pointing at a real
receiver in this process; the delivery worker runs beside the settlement nodes and is
SIGKILLed mid-delivery, the receiver goes down for a while, and the Redis faults drop
delivery messages too. Once the deliveries drain, every event the database holds for
those users must have reached the receiver, correctly signed: duplicates allowed, loss
not.

A PostgreSQL trigger on the throwaway database makes each batch's postings insert sleep
a little (inside the settlement transaction): that is the window the mid-batch kills
aim at, and each kill reports whether it caught a worker inside a batch.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from typing import Any

import pytest

from tests.chaos.checks import (
    check_holds,
    check_replay,
    check_transfers,
    drain,
    fund,
    percentiles,
    read_ledger,
)
from tests.chaos.deliveries import (
    ChaosReceiver,
    check_deliveries,
    drain_deliveries,
    register_webhooks,
)
from tests.chaos.faults import Faults
from tests.chaos.harness import Stack, wait_until
from tests.chaos.load import (
    ApiClient,
    Load,
    Recorder,
    Submitted,
    User,
    register_users,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

USERS = int(os.environ.get("CHAOS_USERS", "100"))
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "50"))
MAX_PER_CLIENT = int(os.environ.get("CHAOS_MAX_PER_CLIENT", "80"))
FUNDING = {"USD": "300.00", "EUR": "200.00"}
# After the last fault: every accepted transfer must be final within this.
DRAIN_BOUND_S = 120.0
# Then every webhook delivery must be made within this. The delivery worker may trail
# the load by tens of seconds on a busy machine (about 5 ms of CPU per delivery).
DELIVERY_DRAIN_BOUND_S = 120.0
# A test's schedule: retries within seconds, a killed worker's leases back in 4 s.
WEBHOOK_SETTINGS = {
    "WEBHOOK_TIMEOUT": "2",
    "WEBHOOK_LEASE": "4",
    "WEBHOOK_RETRY_BASE": "0.5",
    "WEBHOOK_RETRY_CAP": "2",
    "WEBHOOK_SWEEP_INTERVAL": "1",
    "WEBHOOK_CONCURRENCY": "16",
}

# (seconds after the load started, fault, args). Workers w1 and w2 take turns.
PLAN: list[tuple[float, str, tuple[Any, ...]]] = [
    (3, "kill_child_mid_batch", ("w1",)),
    (6, "kill_webhooks_mid_delivery", ()),
    (8, "redis_flushall", ()),
    (12, "kill_node_mid_batch", ("w2",)),
    (16, "receiver_down", (4.0,)),
    (17, "duplicate_doorbell", ()),
    (21, "terminate_backends", ()),
    (26, "redis_restart", ()),
    (31, "kill_child_mid_batch", ("w2",)),
    # Frozen longer than the visibility timeout: its messages are redelivered meanwhile.
    (35, "stop_worker", ("w1", 14.0)),
    (39, "kill_node_mid_batch", ("w2",)),
    (47, "kill_webhooks_mid_delivery", ()),
    (52, "pg_restart", ()),
    (58, "sigterm_mid_batch", ("w2",)),
]


def ensure_workers(stack: Stack) -> None:
    """After the storm: every worker node running again (none left stopped or dead)."""
    for name in ("w1", "w2", "webhooks"):
        process = stack.processes[name]
        process.signal_group(signal.SIGCONT)
        if not process.alive():
            process.start()


def late_resends(
    stack: Stack, users: list[User], accepted: list[Submitted], recorder: Recorder
) -> tuple[int, list[str]]:
    """A sample of requests re-sent after the storm: the same transfer, now final."""
    by_user = {user.id: user for user in users}
    sample = [item for item in accepted if item.route == "single"]
    sample = sample[:: max(1, len(sample) // 100)]
    problems = []
    for item in sample:
        client = ApiClient(stack.base_url, recorder, by_user[item.requested_by].auth)
        try:
            response = client.request(
                "POST",
                f"/users/{item.requested_by}/transfers",
                route="transfer",
                data={"from": item.from_account, "to": item.to_account, "amount": item.amount},
                headers={"Idempotency-Key": item.key},
            )
        finally:
            client.close()
        body = response.json()
        if response.status_code != 202 or body.get("id") != item.transfer_id:
            problems.append(f"late re-send of {item.key}: {response.status_code} {body}")
        elif body["status"] == "pending":
            problems.append(f"late re-send of {item.key}: still pending")
    return len(sample), problems


def settle_latency(stack: Stack, load_started_at: float) -> dict[str, Any]:
    """How long accepted transfers waited to be settled, and when the slowest were made."""
    with stack.pg.connect(stack.database) as connection:
        rows = connection.execute(
            "SELECT extract(epoch FROM created_at)::float8, "
            "extract(epoch FROM settled_at - created_at)::float8 FROM transfers "
            "WHERE status = 'settled' AND created_at >= to_timestamp(%s)",
            (load_started_at,),
        ).fetchall()
    if not rows:
        return {}
    waits = sorted(wait for _, wait in rows)
    slowest = sorted(rows, key=lambda row: row[1], reverse=True)[:3]
    return {
        "settle latency p50 / p99 / max s": (
            f"{waits[len(waits) // 2]:.2f} / {waits[int(len(waits) * 0.99)]:.2f} / {waits[-1]:.2f}"
        ),
        "slowest were created at (s into the load)": [
            round(created - load_started_at, 1) for created, _ in slowest
        ],
    }


def doorbells_delivered_twice(stack: Stack) -> int:
    """Settle messages (by task id) that workers received more than once: redeliveries
    after kills and the freeze, and the duplicates published on purpose."""
    received: Counter[str] = Counter()
    for name in ("w1", "w2"):
        text = stack.processes[name].log_path.read_text(errors="replace")
        received.update(re.findall(r"Task remit\.settle\[([0-9a-f-]{36})\] received", text))
    return sum(1 for count in received.values() if count > 1)


def test_nothing_lost_nothing_twice(stack_factory, chaos_summary) -> None:
    started = time.monotonic()
    stack: Stack = stack_factory("main", batch_delay=0.15, settings=WEBHOOK_SETTINGS)
    stack.start_web()
    for name in ("w1", "w2"):
        stack.start_worker(name)
    stack.start_webhooks()
    stack.start_beat()
    stack.wait_web()
    for name in ("w1", "w2", "webhooks"):
        stack.wait_worker_ready(name)

    recorder = Recorder()
    receiver = ChaosReceiver()
    users = register_users(stack.base_url, USERS)
    paths = register_webhooks(stack, users, receiver)
    funding_ids = fund(stack, users, recorder, FUNDING)
    wait_until(
        lambda: stack.status_counts().get("pending", 0) == 0,
        60,
        0.2,
        "the funding deposits to settle",
    )
    setup_s = time.monotonic() - started

    # Load and faults.
    load = Load(stack.base_url, users, recorder, clients=CLIENTS, max_per_client=MAX_PER_CLIENT)
    faults = Faults(stack, receiver)
    load_started, load_started_at = time.monotonic(), time.time()
    stack.watch()
    load.start()
    try:
        faults.run(PLAN)
    finally:
        load.finish()
        ensure_workers(stack)
    load_s = time.monotonic() - load_started

    # Quiescence, then the ledger against what the clients were told.
    drain_s, counts = drain(stack, DRAIN_BOUND_S)
    delivery_drain_s, deliveries_left = drain_deliveries(stack, DELIVERY_DRAIN_BOUND_S)
    transfers, commission_accounts, balances, holds, stuck = read_ledger(stack)
    accepted = load.submitted
    problems = check_transfers(transfers, accepted, funding_ids)
    problems += check_replay(transfers, commission_accounts, balances)
    problems += check_holds(holds, load.holds)
    audit_status, audit_report = stack.audit()
    violations = [line for line in audit_report.splitlines() if not line.startswith("audit:")]
    final_resends, resend_problems = late_resends(stack, users, accepted, recorder)
    problems += resend_problems
    webhook_summary, webhook_problems = check_deliveries(stack, receiver, paths)
    receiver.stop()

    bad_5xx, no_answer = recorder.bad_5xx(), recorder.no_answer()
    summary = {
        "transfers accepted (202)": len({item.transfer_id for item in accepted}),
        "of them via the batch route / deposits / refunds / payouts / captures": " / ".join(
            str(sum(1 for i in accepted if i.route == route))
            for route in ("batch", "deposit", "refund", "payout", "capture")
        ),
        "holds accepted, by final status": dict(Counter(row[1] for row in holds.values())),
        "refused as a client expects (refund too big, hold not active)": dict(load.refused),
        "funded users / clients": f"{len(users)} / {CLIENTS} (+1 depositor)",
        "idempotent re-sends (during / after)": f"{load.resends} / {final_resends}",
        "http answers": recorder.by_status(),
        "503 with Retry-After / other 5xx / no answer": (
            f"{sum(1 for a in recorder.answers if a.acceptable_5xx)} / {len(bad_5xx)}"
            f" / {len(no_answer)}"
        ),
        "keep-alive races (reset on an idle connection, re-sent)": recorder.keepalive_races(),
        "http latency p50 / p99 / max s": percentiles(
            [a.elapsed for a in recorder.answers if a.status]
        ),
        "faults": faults.counts(),
        "doorbells delivered more than once": doorbells_delivered_twice(stack),
        "mid-batch kills confirmed": sum(
            1
            for fault in faults.log
            if fault.name.endswith("mid_batch") and fault.detail.get("mid_batch")
        ),
        "mid-delivery kills confirmed": sum(
            1 for fault in faults.log if fault.detail.get("in_flight")
        ),
        "fault log": [f"{f.at:>5}s {f.name}({f.target}) {f.took}s {f.detail}" for f in faults.log],
        "final statuses": counts,
        **settle_latency(stack, load_started_at),
        "setup / load / drain / delivery drain s": (
            f"{setup_s:.1f} / {load_s:.1f} / {drain_s:.1f} / {delivery_drain_s:.1f}"
        ),
        **{f"webhooks: {key}": value for key, value in webhook_summary.items()},
        "audit violations / other violations": f"{len(violations)} / {len(problems)}",
        "processes that crashed (restarted as a supervisor would)": len(stack.crashes),
        "errors logged": {
            name: process.problems_logged() for name, process in stack.processes.items()
        },
    }
    chaos_summary.add("chaos: nothing lost, nothing twice", summary)

    assert not faults.errors, faults.errors
    # No process died on its own: only the faults injected here ended any.
    assert not stack.crashes, stack.crashes
    assert not load.unexpected, load.unexpected[:20]
    assert not load.gave_up, load.gave_up[:20]
    assert not load.resend_mismatches, load.resend_mismatches[:20]
    assert not bad_5xx, bad_5xx[:20]
    # Every request got an HTTP answer: none hung, none was dropped.
    assert not no_answer, no_answer[:20]
    assert not counts.get("pending"), (f"pending after {DRAIN_BOUND_S:.0f} s", stuck)
    assert audit_status == 0, audit_report
    assert not problems, problems[:30]
    assert len(accepted) >= 1000, f"only {len(accepted)} transfers were accepted"
    routes = Counter(item.route for item in accepted)
    assert routes["refund"] >= 20, routes
    assert routes["payout"] >= 20, routes
    assert routes["capture"] >= 20, routes
    assert {"captured", "voided", "expired"} <= {row[1] for row in holds.values()}, holds
    assert not deliveries_left, f"{deliveries_left} deliveries pending after the bound"
    # Every event of every user reached the receiver, signed; duplicates allowed.
    assert not webhook_problems, webhook_problems[:30]
    for fault in faults.log:
        if fault.name == "sigterm_mid_batch":
            # A clean warm shutdown after the batch in hand and one task slice at most.
            assert fault.detail.get("exit_status") == 0, fault
            assert fault.detail["exit_s"] < 15, fault
