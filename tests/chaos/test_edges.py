"""Graceful shutdown and outages at the edge (issue 3, items 4 and 5), on real processes.

- SIGTERM to a worker in the middle of a batch: the batch in hand finishes (or goes back
  to the queue), the worker exits on its own within a bound, and once it is started
  again every transfer settles, without beat, from the messages alone.
- Broker unreachable: POST transfers still answers 202 (the row is the outbox); once a
  worker and beat with a good broker run, the sweeper gets it settled.
- Database unreachable: every route answers 503 problem+json with Retry-After within a
  bound (never hangs, never 500) and /health names the database; after PostgreSQL is
  back, the API and the worker recover by themselves.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.chaos.harness import Stack, free_port, wait_until
from tests.chaos.load import SUPERUSER_AUTH, User, register_users

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# A request must be answered within this while a dependency is down (never hang).
ANSWER_BOUND_S = 10.0
# Warm shutdown ends after the batch in hand and at most one task slice (worker.tasks
# MAX_SECONDS_PER_TASK, 2.5 s with the 10 s visibility timeout here), plus Celery's own
# stopping; about 5 s on this machine, with room for a busy CI host.
SIGTERM_EXIT_BOUND_S = 15.0


def deposit(stack: Stack, account: int, amount: str, key: str) -> dict[str, Any]:
    response = requests.post(
        f"{stack.base_url}/accounts/{account}/deposits",
        data={"amount": amount},
        auth=SUPERUSER_AUTH,
        headers={"Idempotency-Key": key},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()


def transfer(stack: Stack, payer: User, to: int, amount: str, key: str) -> requests.Response:
    return requests.post(
        f"{stack.base_url}/users/{payer.id}/transfers",
        data={"from": payer.accounts["USD"], "to": to, "amount": amount},
        auth=payer.auth,
        headers={"Idempotency-Key": key},
        timeout=30,
    )


def statuses(stack: Stack, ids: list[int]) -> dict[int, tuple[str, str | None]]:
    with stack.pg.connect(stack.database) as connection:
        rows = connection.execute(
            "SELECT id, status, reason FROM transfers WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def all_final(stack: Stack) -> bool:
    counts = stack.status_counts()
    return not counts.get("pending") and not counts.get("failed")


def app_backends(stack: Stack, app: str) -> list[tuple[Any, ...]]:
    with stack.pg.connect() as connection:
        return connection.execute(
            "SELECT pid, state, xact_start FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s",
            (stack.database, f"remit-{app}"),
        ).fetchall()


def test_sigterm_mid_batch_loses_nothing(stack_factory, chaos_summary) -> None:
    # Batches of 25 that each take a second: SIGTERM lands while one is in hand.
    stack: Stack = stack_factory("sigterm", batch_delay=1.0, settings={"SETTLE_BATCH_SIZE": "25"})
    stack.start_web()
    worker = stack.start_worker("w1")
    stack.wait_web()
    stack.wait_worker_ready("w1")
    payer, payee = register_users(stack.base_url, 2)
    funding = deposit(stack, payer.accounts["USD"], "1000", "fund")
    wait_until(
        lambda: statuses(stack, [funding["id"]])[funding["id"]][0] == "settled", 30, 0.1, "funding"
    )

    batch = {
        "transfers": [
            {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1.00"}
            for _ in range(100)
        ]
    }
    for _ in range(2):
        response = requests.post(
            f"{stack.base_url}/users/{payer.id}/transfers/batch",
            json=batch,
            auth=payer.auth,
            timeout=30,
        )
        assert response.status_code == 202, response.text
    wait_until(lambda: stack.settling_backend("w1"), 30, 0.01, "w1 to be inside a batch")

    settled_before = stack.status_counts().get("settled", 0)
    sigterm_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    # Accepted while the worker shuts down: their doorbells wait in Redis for the restart.
    late = []
    for index in range(20):
        response = transfer(stack, payer, payee.accounts["USD"], "2.00", f"late-{index}")
        assert response.status_code == 202, response.text
        late.append(response.json()["id"])
    exit_status = worker.wait(60)
    exit_s = time.monotonic() - sigterm_at
    assert exit_status is not None, f"w1 still running 60 s after SIGTERM:\n{worker.log_tail()}"
    worker.kill()  # the group's leftovers, if any
    # Nothing left half-done: no transaction of the worker survives it, the ledger holds.
    wait_until(lambda: not app_backends(stack, "w1"), 10, 0.1, "w1's connections to close")
    audit_status, audit_report = stack.audit()
    assert audit_status == 0, audit_report
    at_exit = stack.status_counts()

    restarted = time.monotonic()
    stack.restart("w1")
    wait_until(lambda: all_final(stack), 90, 0.25, "every transfer final after the restart")
    drained_s = time.monotonic() - restarted
    final = stack.status_counts()
    audit_status, audit_report = stack.audit()
    chaos_summary.add(
        "SIGTERM mid-batch",
        {
            "transfers": 201 + len(late),
            "exit status / exit after SIGTERM s": f"{exit_status} / {exit_s:.1f}",
            "statuses when it exited": at_exit,
            "final statuses": final,
            "all final after restart (no beat) s": f"{drained_s:.1f}",
            "audit": "ok" if audit_status == 0 else audit_report,
        },
    )
    assert exit_status == 0, worker.log_tail()
    assert exit_s < SIGTERM_EXIT_BOUND_S, f"warm shutdown took {exit_s:.1f} s"
    # The batch in hand was finished (committed), not abandoned...
    assert at_exit.get("settled", 0) >= settled_before + 25, (settled_before, at_exit)
    # ...the backlog outlived the worker, and the restart settled it from the queued messages.
    assert at_exit.get("pending"), at_exit
    assert final == {"settled": 201 + len(late)}, final
    assert audit_status == 0, audit_report


def test_broker_unreachable_accepts_and_sweeper_settles(stack_factory, chaos_summary) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    stack: Stack = stack_factory("nobroker")
    stack.start_web(redis_url=closed)
    stack.wait_web()

    health = requests.get(stack.base_url + "/health", timeout=ANSWER_BOUND_S)
    assert health.status_code == 503, health.text
    assert health.json() == {"status": "unavailable", "database": "ok", "broker": "unavailable"}
    assert health.headers.get("Retry-After")

    payer, payee = register_users(stack.base_url, 2)
    timings = []
    started = time.monotonic()
    funding = deposit(stack, payer.accounts["USD"], "100", "fund")
    timings.append(time.monotonic() - started)
    ids = [funding["id"]]
    for index in range(5):
        started = time.monotonic()
        response = transfer(stack, payer, payee.accounts["USD"], "10", f"t{index}")
        timings.append(time.monotonic() - started)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "pending"
        ids.append(response.json()["id"])
        again = transfer(stack, payer, payee.accounts["USD"], "10", f"t{index}")
        assert (again.status_code, again.json()["id"]) == (202, ids[-1])
    assert max(timings) < ANSWER_BOUND_S, timings
    assert {status for status, _ in statuses(stack, ids).values()} == {"pending"}

    # A worker and beat with a good broker: the sweeper finds the rows and rings for them.
    started = time.monotonic()
    stack.start_worker("w1")
    stack.start_beat()
    wait_until(lambda: all_final(stack), 60, 0.25, "the sweeper to settle the outbox")
    settled_s = time.monotonic() - started
    final = statuses(stack, ids)
    audit_status, audit_report = stack.audit()
    chaos_summary.add(
        "broker unreachable",
        {
            "POSTs answered 202 (max s)": f"{len(timings)} ({max(timings):.2f})",
            "settled by the sweeper after worker+beat start s": f"{settled_s:.1f}",
            "final": sorted({status for status, _ in final.values()}),
        },
    )
    assert {status for status, _ in final.values()} == {"settled"}, final
    assert audit_status == 0, audit_report


def _expect_503(response: requests.Response, elapsed: float, what: str) -> None:
    assert elapsed < ANSWER_BOUND_S, f"{what} took {elapsed:.1f} s"
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    assert response.headers.get("Retry-After"), f"{what}: no Retry-After"
    if what != "GET /health":
        assert response.headers["Content-Type"].startswith("application/problem+json"), what
        assert response.json()["code"] == "service_unavailable", response.text


def test_database_unreachable_answers_503(stack_factory, chaos_servers, chaos_summary) -> None:
    stack: Stack = stack_factory("nodb")
    stack.start_web()
    stack.start_worker("w1")
    stack.start_beat()
    stack.wait_web()
    stack.wait_worker_ready("w1")
    payer, payee = register_users(stack.base_url, 2)
    deposit(stack, payer.accounts["USD"], "100", "fund")
    wait_until(lambda: all_final(stack), 30, 0.1, "funding")
    first = transfer(stack, payer, payee.accounts["USD"], "1", "before")
    assert first.status_code == 202

    pg, _ = chaos_servers
    pg.stop("fast")
    # (GET /currencies is left out: seed data served from a per-process cache.)
    requests_during_outage: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", f"/users/{payer.id}/transfers", {"auth": payer.auth, "data": {}}),
        ("GET", f"/users/{payer.id}/transfers/{first.json()['id']}", {"auth": payer.auth}),
        ("GET", f"/accounts/{payer.accounts['USD']}", {"auth": payer.auth}),
        ("POST", "/users", {"data": {"username": "newcomer", "password": "long enough"}}),
        ("POST", f"/accounts/{payee.accounts['USD']}/deposits", {"auth": SUPERUSER_AUTH}),
    ]
    requests_during_outage[0][2]["data"] = {
        "from": payer.accounts["USD"],
        "to": payee.accounts["USD"],
        "amount": "1",
    }
    requests_during_outage[4][2]["data"] = {"amount": "5"}
    slowest = 0.0
    answers = 0
    try:
        for _ in range(3):  # a fresh pool, a pool of dead connections, and again
            for method, path, options in requests_during_outage:
                started = time.monotonic()
                response = requests.request(method, stack.base_url + path, timeout=30, **options)
                elapsed = time.monotonic() - started
                slowest = max(slowest, elapsed)
                answers += 1
                _expect_503(response, elapsed, f"{method} {path}")
            started = time.monotonic()
            health = requests.get(stack.base_url + "/health", timeout=30)
            elapsed = time.monotonic() - started
            _expect_503(health, elapsed, "GET /health")
            assert health.json() == {
                "status": "unavailable",
                "database": "unavailable",
                "broker": "ok",
            }
        # Many at once: every gunicorn thread busy with a dead database still answers.
        storm_started = time.monotonic()
        with ThreadPoolExecutor(40) as pool:
            statuses_seen = list(pool.map(lambda i: _timed_post(stack, payer, payee, i), range(40)))
        storm_s = time.monotonic() - storm_started
    finally:
        pg.start()

    for status, elapsed, retry_after, content_type in statuses_seen:
        assert elapsed < ANSWER_BOUND_S, statuses_seen
        assert (status, bool(retry_after)) == (503, True), statuses_seen
        assert content_type.startswith("application/problem+json"), statuses_seen

    # Back: the API and the worker recover on their own.
    recovered_started = time.monotonic()
    wait_until(
        lambda: requests.get(stack.base_url + "/health", timeout=30).status_code == 200,
        30,
        0.2,
        "/health to recover",
    )
    recovered_s = time.monotonic() - recovered_started
    after = transfer(stack, payer, payee.accounts["USD"], "1", "after")
    assert after.status_code == 202, after.text
    wait_until(lambda: all_final(stack), 60, 0.25, "settlement after the outage")
    audit_status, audit_report = stack.audit()
    chaos_summary.add(
        "database unreachable",
        {
            "503 answers (slowest s)": f"{answers + len(statuses_seen)} ({slowest:.2f})",
            "40 concurrent POSTs answered within s": f"{storm_s:.2f}",
            "healthy again after restart s": f"{recovered_s:.1f}",
            "final statuses": stack.status_counts(),
        },
    )
    assert audit_status == 0, audit_report


def _timed_post(stack: Stack, payer: User, payee: User, index: int) -> tuple[Any, ...]:
    started = time.monotonic()
    try:
        response = transfer(stack, payer, payee.accounts["USD"], "1", f"storm-{index}")
    except requests.RequestException as error:
        return (repr(error), time.monotonic() - started, None, "")
    return (
        response.status_code,
        time.monotonic() - started,
        response.headers.get("Retry-After"),
        response.headers.get("Content-Type", ""),
    )


def test_redis_restart_while_a_worker_is_busy(stack_factory, chaos_summary) -> None:
    """The broker goes away while a worker is inside a settlement (a late-ack message
    unacknowledged): the worker must ride it out and reconnect, not exit."""
    stack: Stack = stack_factory("busyredis", batch_delay=3.0)
    stack.start_web()
    worker = stack.start_worker("w1")
    stack.wait_web()
    stack.wait_worker_ready("w1")
    payer, payee = register_users(stack.base_url, 2)
    funding = deposit(stack, payer.accounts["USD"], "100", "fund")
    wait_until(lambda: stack.settling_backend("w1"), 30, 0.01, "w1 to be inside a batch")

    stack.redis.stop()
    time.sleep(2)
    stack.redis.start()
    # The batch in hand commits; the worker reconnects and settles what comes next.
    wait_until(
        lambda: statuses(stack, [funding["id"]])[funding["id"]][0] == "settled",
        30,
        0.1,
        "the deposit to settle",
    )
    # Without beat: the transfer after the restart settles from its doorbell alone, so
    # the worker that was busy when Redis went away is consuming again.
    after = transfer(stack, payer, payee.accounts["USD"], "1", "after-restart")
    assert after.status_code == 202, after.text
    settled = True
    try:
        wait_until(lambda: all_final(stack), 30, 0.25, "settlement after the Redis restart")
    except AssertionError:
        settled = False
    alive = worker.alive()
    chaos_summary.add(
        "Redis restart under a busy worker",
        {"worker survived": alive, "final statuses": stack.status_counts()},
    )
    assert alive, f"w1 exited when Redis restarted:\n{worker.log_tail(30)}"
    assert settled, f"nothing settled after the Redis restart:\n{worker.log_tail(30)}"
    audit_status, audit_report = stack.audit()
    assert audit_status == 0, audit_report


def test_long_polls_never_take_the_last_threads(stack_factory, chaos_summary) -> None:
    """No settler runs, so every long poll would be held for its whole `wait`: more of
    them than a web process has threads must still leave threads for payments and
    /health. Those beyond the process's long-poll slots answer at once, with the
    transfer as it is and Retry-After."""
    threads, wait_s, polls = 4, 8, 8
    stack: Stack = stack_factory(
        "longpolls", settings={"WEB_CONCURRENCY": "1", "WEB_THREADS": str(threads)}
    )
    stack.start_web()
    stack.wait_web()
    payer, payee = register_users(stack.base_url, 2)
    pending = transfer(stack, payer, payee.accounts["USD"], "1", "held").json()
    url = f"{stack.base_url}/users/{payer.id}/transfers/{pending['id']}?wait={wait_s}"

    def long_poll(_: int) -> tuple[float, requests.Response]:
        started = time.monotonic()
        response = requests.get(url, auth=payer.auth, timeout=3 * wait_s)
        return time.monotonic() - started, response

    with ThreadPoolExecutor(polls) as pool:
        held = [pool.submit(long_poll, index) for index in range(polls)]
        time.sleep(1.0)
        started = time.monotonic()
        paid = transfer(stack, payer, payee.accounts["USD"], "1", "while held")
        paid_s = time.monotonic() - started
        started = time.monotonic()
        health = requests.get(stack.base_url + "/health", timeout=3 * wait_s)
        health_s = time.monotonic() - started
        answers = [future.result() for future in held]

    chaos_summary.add(
        "long polls beyond the threads",
        {
            "POST / health while held s": f"{paid_s:.2f} / {health_s:.2f}",
            "long polls held to their wait / answered at once": (
                f"{sum(s >= wait_s - 0.5 for s, _ in answers)} / "
                f"{sum(s < wait_s / 2 for s, _ in answers)}"
            ),
        },
    )
    assert paid.status_code == 202, paid.text
    assert health.status_code == 200, health.text
    assert paid_s < 2, paid_s
    assert health_s < 2, health_s
    for _, response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "pending"
    early = [response for elapsed, response in answers if elapsed < wait_s / 2]
    assert early, "more long polls than threads, yet none answered early"
    assert all(response.headers.get("Retry-After") for response in early)
    assert len(early) < polls, "no long poll was held at all"
