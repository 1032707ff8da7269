"""Many requests at once on the same accounts: no overdraft, no lost update, no duplicates."""

from __future__ import annotations

import random
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from common.audit import audit
from common.db import script_session
from common.doorbells import ring
from tests.conftest import SUPERUSER, Api, Member, settlement_held, sweep_until
from worker.tasks import settle

pytestmark = pytest.mark.slow

THREADS = 16


def _in_parallel(app: Any, jobs: list[Any], worker: Any) -> list[Any]:
    """Run `worker(client, job)` for every job from THREADS threads, one test client each."""

    def run(chunk: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        client = app.test_client()
        return [(index, worker(client, job)) for index, job in chunk]

    chunks: list[list[tuple[int, Any]]] = [[] for _ in range(THREADS)]
    for index, job in enumerate(jobs):
        chunks[index % THREADS].append((index, job))
    with ThreadPoolExecutor(THREADS) as pool:
        results = [pair for chunk in pool.map(run, chunks) for pair in chunk]
    return [result for _, result in sorted(results, key=lambda pair: pair[0])]


def _random_usd_transfers(
    members: list[Member], rng: random.Random, count: int, low_cents: int, high_cents: int
) -> list[tuple[Member, int, int, str]]:
    """`count` transfers between random distinct members, amounts in [low, high] cents."""
    jobs = []
    for _ in range(count):
        payer, payee = rng.sample(members, 2)
        cents = rng.randint(low_cents, high_cents)
        amount = f"{cents // 100}.{cents % 100:02d}"
        jobs.append((payer, payer.accounts["USD"], payee.accounts["USD"], amount))
    return jobs


def _post_transfer(client: Any, job: tuple[Member, int, int, str]) -> tuple[int, dict]:
    payer, source, target, amount = job
    response = client.post(
        f"/users/{payer.id}/transfers",
        data={"from": source, "to": target, "amount": amount},
        headers=payer.auth,
    )
    return response.status_code, response.get_json()


def _minor(amount: str) -> int:
    units, cents = amount.split(".")
    return int(units) * 100 + int(cents)


def _replay_in_id_order(
    transfers: list[dict], start: dict[int, int], commission_account: int
) -> tuple[dict[int, int], dict[int, str]]:
    """The reference: apply transfers one by one in id order, the obvious way."""
    balances = dict(start)
    outcome = {}
    for transfer in sorted(transfers, key=lambda t: t["id"]):
        amount, commission = _minor(transfer["amount"]), _minor(transfer["commission"])
        if balances[transfer["from"]] < amount + commission:
            outcome[transfer["id"]] = "rejected"
            continue
        balances[transfer["from"]] -= amount + commission
        balances[transfer["to"]] += amount
        balances[commission_account] = balances.get(commission_account, 0) + commission
        outcome[transfer["id"]] = "settled"
    return balances, outcome


def _usd_balances(api: Api, members: list[Member]) -> dict[int, int]:
    return {m.accounts["USD"]: _minor(api.balance(m, m.accounts["USD"])) for m in members}


def _commission_balance() -> int:
    with script_session() as session:
        return session.scalar(
            text(
                "SELECT a.balance FROM accounts a JOIN currencies c "
                "ON c.commission_account_id = a.id WHERE c.code = 'USD'"
            )
        )


def test_200_concurrent_transfers_settle_as_if_applied_in_id_order(api: Api, app: Any) -> None:
    members = [api.funded(f"{random.randint(5, 40)}.00") for _ in range(5)]
    rng = random.Random(20261127)
    jobs = _random_usd_transfers(members, rng, 200, 1, 900)
    start = _usd_balances(api, members)
    commission_start = _commission_balance()

    # Hold the USD settlement lock while the 200 requests race in, so that the worker
    # settles them only once all are committed: then "id order" is well defined.
    with settlement_held("USD"):
        results = _in_parallel(app, jobs, _post_transfer)
    assert [status for status, _ in results] == [202] * 200
    accepted = [body for _, body in results]
    assert len({t["id"] for t in accepted}) == 200

    final = [api.wait_final(SUPERUSER, t["id"]) for t in accepted]
    assert all(t["status"] in ("settled", "rejected") for t in final)

    expected_balances, expected_outcome = _replay_in_id_order(accepted, start, -1)
    assert {t["id"]: t["status"] for t in final} == expected_outcome
    assert _usd_balances(api, members) == {k: v for k, v in expected_balances.items() if k != -1}
    assert _commission_balance() - commission_start == expected_balances.get(-1, 0)
    assert all(balance >= 0 for balance in _usd_balances(api, members).values())
    with script_session() as session:
        # Each transfer final exactly once: settled ones have their legs once, rejected none.
        legs = Counter(
            session.scalars(
                text("SELECT transfer_id FROM postings WHERE transfer_id = ANY(:ids)"),
                {"ids": [t["id"] for t in accepted]},
            )
        )
        for transfer in final:
            expected = (
                (3 if transfer["commission"] != "0.00" else 2)
                if transfer["status"] == "settled"
                else 0
            )
            assert legs.get(transfer["id"], 0) == expected
        assert audit(session) == []


def test_transfers_racing_the_worker_never_overdraw(api: Api, app: Any) -> None:
    """No lock held: submissions and settlements interleave freely; invariants hold."""
    members = [api.funded("20.00") for _ in range(4)]
    rng = random.Random(7)
    jobs = _random_usd_transfers(members, rng, 200, 100, 700)
    total_before = sum(_usd_balances(api, members).values()) + _commission_balance()
    results = _in_parallel(app, jobs, _post_transfer)
    assert [s for s, _ in results if s != 202] == [], [b for s, b in results if s != 202][:3]
    final = [api.wait_final(SUPERUSER, body["id"]) for _, body in results]
    assert all(t["status"] in ("settled", "rejected") for t in final)
    assert any(t["status"] == "rejected" for t in final), "the test should exhaust some funds"
    balances = _usd_balances(api, members)
    assert all(balance >= 0 for balance in balances.values())
    # No lost update: the money among these accounts and the commission account is conserved.
    assert sum(balances.values()) + _commission_balance() == total_before
    with script_session() as session:
        assert audit(session) == []


def test_twenty_concurrent_requests_with_one_key_make_one_transfer(api: Api, app: Any) -> None:
    alice, bob = api.funded("50.00"), api.register()
    key = "pay-bob-" + secrets.token_hex(4)

    def post(client: Any, _: int) -> tuple[int, dict]:
        response = client.post(
            f"/users/{alice.id}/transfers",
            data={"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "5.00"},
            headers={**alice.auth, "Idempotency-Key": key},
        )
        return response.status_code, response.get_json()

    results = _in_parallel(app, list(range(20)), post)
    assert {status for status, _ in results} == {202}
    assert len({body["id"] for _, body in results}) == 1
    transfer_id = results[0][1]["id"]
    assert api.wait_final(alice, transfer_id)["status"] == "settled"
    assert api.balance(bob, bob.accounts["USD"]) == "5.00"
    with script_session() as session:
        count = session.scalar(
            text("SELECT count(*) FROM transfers WHERE requested_by = :u"), {"u": alice.id}
        )
    assert count == 1


def test_concurrent_account_opening_respects_the_limit(api: Api, app: Any) -> None:
    member = api.register()  # holds 3 accounts already

    def open_one(client: Any, _: int) -> int:
        return client.post(f"/users/{member.id}/accounts/EUR", headers=member.auth).status_code

    statuses = Counter(_in_parallel(app, list(range(60)), open_one))
    assert statuses == {201: 47, 409: 13}


def test_duplicate_doorbells_under_load_settle_each_transfer_once(api: Api) -> None:
    alice, bob = api.funded("100.00"), api.register()
    ids = []
    for _ in range(20):
        response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00")
        ids.append(response.get_json()["id"])
    for _ in range(5):
        for transfer_id in ids:
            ring("USD", [transfer_id])
    settle.apply(("USD",))  # and once more in this thread, racing the worker
    assert all(api.wait_final(alice, i)["status"] == "settled" for i in ids)
    assert api.balance(bob, bob.accounts["USD"]) == "20.00"
    assert api.balance(alice, alice.accounts["USD"]) == "79.80"
    with script_session() as session, session.begin():
        assert audit(session) == []


def test_holds_captures_voids_and_transfers_at_once_on_one_account(app: Any, api: Api) -> None:
    """One payer's account under holds, captures, voids and transfers from 16 threads:
    never overdrawn, each reservation released once, the audit clean."""
    payer, payee = api.funded("50.00"), api.register()
    source, target = payer.accounts["USD"], payee.accounts["USD"]
    rng = random.Random(1616)

    def place(client: Any, cents: int) -> dict:
        amount = f"{cents // 100}.{cents % 100:02d}"
        response = client.post(
            f"/users/{payer.id}/holds",
            data={"from": source, "to": target, "amount": amount},
            headers=payer.auth,
        )
        assert response.status_code == 202, response.get_json()
        return response.get_json()

    holds = _in_parallel(app, [rng.randint(100, 900) for _ in range(40)], place)

    def act(client: Any, job: tuple[str, int]) -> tuple[str, int, str | None]:
        action, hold_id = job
        if action == "transfer":
            response = client.post(
                f"/users/{payer.id}/transfers",
                data={"from": source, "to": target, "amount": "1.50"},
                headers=payer.auth,
            )
        else:
            body = {"amount": "2.00"} if action == "capture" and hold_id % 2 else {}
            response = client.post(
                f"/users/{payer.id}/holds/{hold_id}/{action}", json=body, headers=payer.auth
            )
        return action, response.status_code, (response.get_json() or {}).get("code")

    jobs = [
        (rng.choice(("capture", "void", "capture", "transfer")), rng.choice(holds)["id"])
        for _ in range(160)
    ]
    outcomes = _in_parallel(app, jobs, act)
    # Every answer is an acceptance or a hold that is no longer active; never a 5xx.
    assert {(status, code) for _, status, code in outcomes} <= {
        (202, None),
        (409, "hold_not_active"),
    }, Counter(outcomes)
    ring("USD")
    sweep_until(lambda: _holds_settled([h["id"] for h in holds]) and _nothing_pending(payer.id))
    with script_session() as session, session.begin():
        assert audit(session) == []
        balance, held = session.execute(
            text("SELECT balance, held FROM accounts WHERE id = :id"), {"id": source}
        ).one()
        statuses = Counter(
            session.scalars(
                text("SELECT status FROM holds WHERE id = ANY(:ids)"),
                {"ids": [h["id"] for h in holds]},
            )
        )
    assert 0 <= held <= balance
    assert statuses["captured"] > 0, statuses
    assert statuses["voided"] > 0, statuses


def _holds_settled(hold_ids: list[int]) -> bool:
    with script_session() as session, session.begin():
        return not session.scalar(
            text(
                "SELECT count(*) FROM holds WHERE id = ANY(:ids) AND (status = 'pending' OR"
                " (status = 'held' AND (void_requested_at IS NOT NULL OR transfer_id IS NOT NULL)))"
            ),
            {"ids": hold_ids},
        )


def _nothing_pending(user_id: int) -> bool:
    with script_session() as session, session.begin():
        return not session.scalar(
            text("SELECT count(*) FROM transfers WHERE status = 'pending' AND from_user_id = :u"),
            {"u": user_id},
        )
