"""Group commit: concurrent POSTs of one process share INSERT statements, and each
request still gets its own transfer, its idempotency rules and its own errors.

To make requests share a statement for sure, the first one is held up: its
Idempotency-Key is taken by a transaction the test keeps open, so its INSERT waits on
that key while the others queue behind it; then the test ends the transaction.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from common.db import autocommit_connection, new_session
from common.transfers import _GROUP, _ROW_COLUMNS
from tests.conftest import Api, Member


@contextmanager
def _key_held(payer: Member, key: str, target: int) -> Iterator[None]:
    """A transfer of `payer` with `key`, inserted and left uncommitted until the end."""
    session = new_session()
    try:
        session.execute(
            text(
                "INSERT INTO transfers (from_account_id, to_account_id, from_user_id, "
                "to_user_id, currency, amount, commission, requested_by, idempotency_key, "
                "request_fingerprint) SELECT :source, :target, :payer, a.user_id, 'USD', 1, 0, "
                ":payer, :key, 'held' FROM accounts a WHERE a.id = :target"
            ),
            {"source": payer.accounts["USD"], "target": target, "payer": payer.id, "key": key},
        )
        yield
        session.commit()
    finally:
        session.close()


def _an_insert_waits_on_the_key(timeout: float = 10) -> None:
    """Until a request's INSERT is blocked on the key the test holds."""
    deadline = time.monotonic() + timeout
    with new_session() as session:
        while not session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO transfers%'"
            )
        ):
            assert time.monotonic() < deadline, "no INSERT is waiting on the held key"
            session.rollback()
            time.sleep(0.005)


def _queue_reaches(count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _GROUP.queued() < count:
        assert time.monotonic() < deadline, f"only {_GROUP.queued()} requests queued"
        time.sleep(0.005)


def _post(payer: Member, target: int, amount: str, **headers: str) -> Callable[[Any], Any]:
    def send(client: Any) -> Any:
        return client.post(
            f"/users/{payer.id}/transfers",
            data={"from": payer.accounts["USD"], "to": target, "amount": amount},
            headers={**payer.auth, **headers},
        )

    return send


def _held_leader_then(
    app: Any, payer: Member, payee: Member, others: list[Callable[[Any], Any]]
) -> tuple[Any, list[Any], tuple[int, int]]:
    """Hold one POST in its INSERT, run `others` meanwhile (they queue), release.
    Returns the held POST's response, the others' results, and the statements and rows
    the group ran after the release."""
    key = f"held-{secrets.token_hex(4)}"
    with ThreadPoolExecutor(len(others) + 1) as pool:
        with _key_held(payer, key, payee.accounts["USD"]):
            held = _post(payer, payee.accounts["USD"], "2.00", **{"Idempotency-Key": key})
            first = pool.submit(held, app.test_client())
            _an_insert_waits_on_the_key()
            futures: list[Future[Any]] = [pool.submit(job, app.test_client()) for job in others]
            _queue_reaches(len(others))
            statements, rows = _GROUP.statements, _GROUP.rows
        held_response = first.result(timeout=30)
        results = [future.result(timeout=30) for future in futures]
    return held_response, results, (_GROUP.statements - statements, _GROUP.rows - rows)


def test_queued_requests_share_one_statement_and_each_gets_its_own_transfer(
    api: Api, app: Any
) -> None:
    payer, payee = api.register(), api.register()
    amounts = ["1.01", "2.02", "3.03", "4.04", "5.05"]
    held, responses, (statements, rows) = _held_leader_then(
        app, payer, payee, [_post(payer, payee.accounts["USD"], a) for a in amounts]
    )
    # The held request's key was taken with other fields.
    assert held.status_code == 422
    assert held.get_json()["code"] == "idempotency_key_mismatch"
    assert [r.status_code for r in responses] == [202] * len(amounts)
    bodies = [r.get_json() for r in responses]
    assert [b["amount"] for b in bodies] == amounts
    assert len({b["id"] for b in bodies}) == len(amounts)
    # The held INSERT (no row: its key conflicted), then one statement for the rest.
    assert (statements, rows) == (2, len(amounts))
    for body in bodies:
        assert api.get_transfer(payer, body["id"])["amount"] == body["amount"]


def test_one_key_twice_in_a_shared_statement_is_one_transfer(api: Api, app: Any) -> None:
    payer, payee = api.register(), api.register()
    key = f"twice-{secrets.token_hex(4)}"
    target = payee.accounts["USD"]
    others = [
        _post(payer, target, "7.00", **{"Idempotency-Key": key}),
        _post(payer, target, "7.00", **{"Idempotency-Key": key}),
        _post(payer, target, "8.00", **{"Idempotency-Key": key}),
        _post(payer, target, "9.00"),
    ]
    _, responses, (statements, _) = _held_leader_then(app, payer, payee, others)
    assert statements == 2
    same, again, other_fields, plain = responses
    assert (same.status_code, again.status_code) == (202, 202)
    assert same.get_json()["id"] == again.get_json()["id"]
    assert other_fields.status_code == 422
    assert other_fields.get_json()["code"] == "idempotency_key_mismatch"
    assert plain.status_code == 202
    assert plain.get_json()["amount"] == "9.00"


def _row(payer: Member, payee: Member, source: int, cents: int) -> dict[str, Any]:
    row = dict.fromkeys(_ROW_COLUMNS)
    row.update(
        from_account_id=source,
        to_account_id=payee.accounts["USD"],
        from_user_id=payer.id,
        to_user_id=payee.id,
        currency="USD",
        amount=cents,
        commission=0,
        comment="",
        requested_by=payer.id,
    )
    return row


def test_a_bad_row_fails_alone(api: Api, app: Any) -> None:
    payer, payee = api.register(), api.register()
    good = _row(payer, payee, payer.accounts["USD"], 123)
    bad = _row(payer, payee, 2**62, 456)  # no such account: the foreign key refuses it
    outcomes: dict[str, Any] = {}

    def insert(name: str, row: dict[str, Any]) -> None:
        try:
            with autocommit_connection() as connection:
                outcomes[name] = _GROUP.insert(connection, row)
        except Exception as error:
            outcomes[name] = error

    threads = [
        threading.Thread(target=insert, args=(name, row))
        for name, row in (("good", good), ("bad", bad))
    ]
    key = f"held-{secrets.token_hex(4)}"
    held_row = {**_row(payer, payee, payer.accounts["USD"], 789), "idempotency_key": key}
    with _key_held(payer, key, payee.accounts["USD"]):
        leader = threading.Thread(target=insert, args=("held", held_row))
        leader.start()
        _an_insert_waits_on_the_key()
        for thread in threads:
            thread.start()
        _queue_reaches(2)
    for thread in (leader, *threads):
        thread.join(timeout=30)
    assert outcomes["held"] is None  # its key was taken: no row, as ON CONFLICT DO NOTHING
    assert outcomes["good"].amount == 123
    assert isinstance(outcomes["bad"], IntegrityError)


@pytest.mark.slow
def test_many_threads_posting_at_once_get_their_own_transfers(api: Api, app: Any) -> None:
    payers = [api.register() for _ in range(8)]
    payee = api.register()
    jobs = [(payer, f"{n}.{i:02d}") for i, payer in enumerate(payers) for n in range(1, 11)]
    before = (_GROUP.statements, _GROUP.rows)

    def send(job: tuple[Member, str]) -> tuple[str, Any]:
        payer, amount = job
        return amount, _post(payer, payee.accounts["USD"], amount)(app.test_client())

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    assert all(response.status_code == 202 for _, response in results)
    assert [response.get_json()["amount"] for _, response in results] == [a for a, _ in results]
    assert len({response.get_json()["id"] for _, response in results}) == len(jobs)
    assert _GROUP.rows - before[1] == len(jobs)
