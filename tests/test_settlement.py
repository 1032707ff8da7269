"""Settlement against the real thing: PostgreSQL, Redis and an in-process Celery worker.

Covers exact postings, exactly-once delivery (the same doorbell many times, by
direct call, eager apply and the real broker), the database's own guards (unique
posting legs, the no-overdraft CHECK), the sweeper for transfers whose doorbell
was never rung, the per-currency settlement lock, conservation of money after a
random workload, and the retry of real deadlock/serialization failures.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from celery.signals import task_postrun
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from common.currencies import CurrencyInfo, all_currencies
from common.db import get_engine, retrying, script_session
from common.ledger import SETTLEMENT_LOCK_CLASS, settle_batch
from common.money import format_amount
from common.transfers import TransferRequest, submit_transfer
from tests.conftest import SUPERUSER, Api, Member
from worker.tasks import settle, sweep

# --- helpers ------------------------------------------------------------------------------


def currencies() -> dict[str, CurrencyInfo]:
    with script_session() as session, session.begin():
        return {currency.code: currency for currency in all_currencies(session)}


def fetch(sql: str, **params: Any) -> list[Any]:
    with script_session() as session, session.begin():
        return list(session.execute(text(sql), params).all())


def scalar(sql: str, **params: Any) -> Any:
    with script_session() as session, session.begin():
        return session.scalar(text(sql), params)


def balance_of(account_id: int) -> int:
    return scalar("SELECT balance FROM accounts WHERE id = :id", id=account_id)


def postings_of(transfer_ids: list[int]) -> list[tuple[int, int, str, int, int]]:
    rows = fetch(
        "SELECT transfer_id, account_id, leg, amount, balance_after FROM postings "
        "WHERE transfer_id = ANY(:ids) ORDER BY id",
        ids=transfer_ids,
    )
    return [tuple(row) for row in rows]


def transfer_rows(transfer_ids: list[int]) -> dict[int, tuple[Any, ...]]:
    rows = fetch(
        "SELECT id, status, reason, attempts, settled_at FROM transfers "
        "WHERE id = ANY(:ids) ORDER BY id",
        ids=transfer_ids,
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def statuses(transfer_ids: list[int]) -> dict[int, str]:
    return {tid: row[0] for tid, row in transfer_rows(transfer_ids).items()}


def wait_until_final(transfer_ids: list[int], timeout: float = 30) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        current = statuses(transfer_ids)
        if all(status != "pending" for status in current.values()):
            return current
        assert time.monotonic() < deadline, f"still pending after {timeout}s: {current}"
        time.sleep(0.05)


def submit_without_doorbell(member: Member, source: int, target: int, amount: str) -> int:
    """Accept a transfer exactly as the API does (committed, pending) but ring nothing."""
    with script_session() as session, session.begin():
        accepted = submit_transfer(session, member.id, TransferRequest(source, target, amount))
        assert accepted.created
        return accepted.transfer.id


def open_account(api: Api, member: Member, currency: str) -> int:
    response = api.client.post(f"/users/{member.id}/accounts/{currency}", headers=member.auth)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def snapshot(transfer_ids: list[int], account_ids: list[int]) -> tuple[Any, ...]:
    """Everything a second settlement could change about these transfers and accounts."""
    balances = fetch(
        "SELECT id, balance FROM accounts WHERE id = ANY(:ids) ORDER BY id", ids=account_ids
    )
    return (
        transfer_rows(transfer_ids),
        postings_of(transfer_ids),
        [tuple(row) for row in balances],
    )


def ceil_commission(minor: int, rate: Decimal) -> int:
    return math.ceil(Fraction(minor) * Fraction(str(rate)))


@pytest.fixture
def deliver(settlement_worker: Any) -> Iterator[Callable[..., None]]:
    """Publish `settle` doorbells to the real worker through Redis and wait until it ran them.

    Completion is observed with Celery's task_postrun signal: the worker runs in this
    process (thread pool), so its signals reach the test.
    """
    lock = threading.Lock()
    done: dict[str, threading.Event] = defaultdict(threading.Event)

    def on_postrun(task_id: str | None = None, **_: Any) -> None:
        with lock:
            done[str(task_id)].set()

    task_postrun.connect(on_postrun, weak=False)

    def publish(currency: str, transfer_ids: list[int] | None = None, copies: int = 1) -> None:
        results = [settle.apply_async((currency, transfer_ids)) for _ in range(copies)]
        for result in results:
            with lock:
                event = done[result.id]
            assert event.wait(30), f"the worker did not run doorbell {result.id}"

    yield publish
    task_postrun.disconnect(on_postrun)


@pytest.fixture(scope="module")
def money() -> dict[str, CurrencyInfo]:
    return currencies()


# --- exact postings -----------------------------------------------------------------------


def test_deposit_then_transfers_settle_with_exact_balances_and_postings(
    api: Api, money: dict[str, CurrencyInfo]
) -> None:
    usd, eur = money["USD"], money["EUR"]
    alice, bob = api.register(), api.register()
    savings = open_account(api, alice, "USD")

    deposit = api.deposit(alice.accounts["USD"], "100.00")
    assert deposit["commission"] == "0.00"
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    debit, credit = postings_of([deposit["id"]])
    assert debit[1:4] == (usd.external_account_id, "debit", -10000)
    assert credit == (deposit["id"], alice.accounts["USD"], "credit", 10000, 10000)

    paid = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "10.00").get_json()
    own = api.transfer(alice, alice.accounts["USD"], savings, "5").get_json()
    eur_deposit = api.deposit(alice.accounts["EUR"], "20.00")
    assert api.wait_final(SUPERUSER, eur_deposit["id"])["status"] == "settled"
    euros = api.transfer(alice, alice.accounts["EUR"], bob.accounts["EUR"], "10.01").get_json()
    for transfer in (paid, own, euros):
        assert api.wait_final(alice, transfer["id"])["status"] == "settled", transfer

    # Cross-user: the payer pays amount + ceil(1 %), the commission goes to USD's account.
    assert paid["commission"] == "0.10"
    debit, credit, fee = postings_of([paid["id"]])
    assert debit == (paid["id"], alice.accounts["USD"], "debit", -1010, 8990)
    assert credit == (paid["id"], bob.accounts["USD"], "credit", 1000, 1000)
    assert fee[1:4] == (usd.commission_account_id, "commission", 10)
    # Between one user's own accounts: no commission, no commission leg.
    assert own["commission"] == "0.00"
    assert postings_of([own["id"]]) == [
        (own["id"], alice.accounts["USD"], "debit", -500, 8490),
        (own["id"], savings, "credit", 500, 500),
    ]
    # EUR at 3 %: 10.01 x 0.03 = 0.3003, rounded up to 0.31, paid to EUR's account.
    assert euros["commission"] == "0.31"
    legs = postings_of([euros["id"]])
    assert [leg[1:4] for leg in legs] == [
        (alice.accounts["EUR"], "debit", -1032),
        (bob.accounts["EUR"], "credit", 1001),
        (eur.commission_account_id, "commission", 31),
    ]
    assert legs[0][4] == 2000 - 1032

    assert api.balance(alice, alice.accounts["USD"]) == "84.90"
    assert api.balance(alice, savings) == "5.00"
    assert api.balance(alice, alice.accounts["EUR"]) == "9.68"
    assert api.balance(bob, bob.accounts["USD"]) == "10.00"
    assert api.balance(bob, bob.accounts["EUR"]) == "10.01"
    assert balance_of(alice.accounts["USD"]) == 8490

    ids = [deposit["id"], paid["id"], own["id"], eur_deposit["id"], euros["id"]]
    for status, reason, _, settled_at in transfer_rows(ids).values():
        assert (status, reason) == ("settled", None)
        assert settled_at is not None


def test_insufficient_funds_is_rejected_and_moves_nothing(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    # 10.00 + 0.10 commission > 10.00.
    response = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "10.00")
    final = api.wait_final(alice, response.get_json()["id"])
    assert (final["status"], final["reason"], final["settled_at"]) == (
        "rejected",
        "insufficient_funds",
        None,
    )
    assert postings_of([final["id"]]) == []
    assert api.balance(alice, alice.accounts["USD"]) == "10.00"
    assert api.balance(bob, bob.accounts["USD"]) == "0.00"


# --- exactly once -------------------------------------------------------------------------


def test_the_same_doorbell_delivered_again_and_again_settles_once(
    api: Api, money: dict[str, CurrencyInfo], deliver: Callable[..., None]
) -> None:
    alice, bob = api.funded("50.00"), api.register()
    source, target = alice.accounts["USD"], bob.accounts["USD"]
    ids = [submit_without_doorbell(alice, source, target, "20.00") for _ in range(3)]
    assert set(statuses(ids).values()) == {"pending"}

    # First delivery: a direct call of the task function. (Should the worker still hold
    # the USD lock from the deposit's doorbell, it picks these up before letting go.)
    settle("USD", ids)
    assert wait_until_final(ids) == dict(zip(ids, ["settled", "settled", "rejected"], strict=True))
    # The commission leg is in the postings; the shared commission account's balance is
    # left out, since other tests' transfers may move it.
    accounts = [source, target]
    before = snapshot(ids, accounts)
    assert len(before[1]) == 6
    assert {leg[1] for leg in before[1] if leg[2] == "commission"} == {
        money["USD"].commission_account_id
    }
    assert balance_of(source) == 5000 - 2 * 2020

    # Again, eagerly through Celery's own machinery...
    settle.apply(args=("USD", ids)).get()
    assert snapshot(ids, accounts) == before
    # ...again by a direct call...
    settle("USD", ids)
    assert snapshot(ids, accounts) == before
    # ...and several times at once through Redis to the real worker.
    deliver("USD", ids, copies=4)
    # Settled once: the same rows, statuses, settled_at, attempts and balances as after
    # the first delivery.
    assert snapshot(ids, accounts) == before


def test_concurrent_doorbells_for_new_transfers_settle_each_exactly_once(
    api: Api, deliver: Callable[..., None]
) -> None:
    alice, bob = api.funded("100.00"), api.register()
    ids = [
        submit_without_doorbell(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00")
        for _ in range(20)
    ]
    # Eight doorbells for the same work race each other in the worker's four threads.
    deliver("USD", ids, copies=8)
    assert set(wait_until_final(ids).values()) == {"settled"}
    rows = fetch(
        "SELECT transfer_id, count(*) FROM postings WHERE transfer_id = ANY(:ids) "
        "GROUP BY transfer_id",
        ids=ids,
    )
    assert sorted(rows) == [(tid, 3) for tid in ids]
    assert balance_of(alice.accounts["USD"]) == 10000 - 20 * 101
    assert balance_of(bob.accounts["USD"]) == 20 * 100


def test_a_doorbell_for_final_transfers_changes_nothing(
    api: Api, money: dict[str, CurrencyInfo], deliver: Callable[..., None]
) -> None:
    alice, bob = api.funded("5.00", "EUR"), api.register()
    source, target = alice.accounts["EUR"], bob.accounts["EUR"]
    settled = api.transfer(alice, source, target, "1.00").get_json()["id"]
    rejected = api.transfer(alice, source, target, "9.00").get_json()["id"]
    assert api.wait_final(alice, settled)["status"] == "settled"
    assert api.wait_final(alice, rejected)["status"] == "rejected"
    ids = [settled, rejected]
    accounts = [source, target]
    before = snapshot(ids, accounts)

    deliver("EUR", ids)
    settle("EUR", ids)
    settle.apply(args=("EUR", ids)).get()
    with script_session() as session, session.begin():
        # The batch itself finds nothing of ours to claim.
        result = settle_batch(session, "EUR", 500, money["EUR"].commission_account_id)
        assert not set(ids) & {d.transfer_id for d in result.decisions}
    assert snapshot(ids, accounts) == before


def test_unknown_currency_doorbell_is_ignored() -> None:
    assert settle("XXX", [1]) == {"settled": 0, "rejected": 0}


# --- the database's own guards ------------------------------------------------------------


@pytest.fixture
def rollback_connection() -> Iterator[Connection]:
    """A connection whose transaction is always rolled back: hand edits never persist."""
    with get_engine().connect() as connection:
        transaction_ = connection.begin()
        try:
            yield connection
        finally:
            transaction_.rollback()


def _constraint_name(error: DBAPIError) -> str | None:
    return error.orig.diag.constraint_name  # type: ignore[union-attr]


def test_unique_leg_constraint_rejects_a_duplicate_posting(
    api: Api, rollback_connection: Connection
) -> None:
    alice, bob = api.funded("20.00"), api.register()
    transfer = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "3.00").get_json()
    assert api.wait_final(alice, transfer["id"])["status"] == "settled"
    legs = postings_of([transfer["id"]])
    assert len(legs) == 3
    for _, account_id, leg, amount, balance_after in legs:
        with pytest.raises(IntegrityError) as caught, rollback_connection.begin_nested():
            rollback_connection.execute(
                text(
                    "INSERT INTO postings (transfer_id, account_id, leg, amount, "
                    "balance_after) VALUES (:tid, :account, :leg, :amount, :after)"
                ),
                {
                    "tid": transfer["id"],
                    "account": account_id,
                    "leg": leg,
                    "amount": amount,
                    "after": balance_after + amount,
                },
            )
        assert _constraint_name(caught.value) == "uq_postings_transfer_id_leg"
    assert postings_of([transfer["id"]]) == legs


def test_check_constraint_refuses_a_negative_user_balance(
    api: Api, money: dict[str, CurrencyInfo], rollback_connection: Connection
) -> None:
    alice = api.register()
    for account_id in (alice.accounts["USD"], money["USD"].commission_account_id):
        savepoint = rollback_connection.begin_nested()
        with pytest.raises(IntegrityError) as caught:
            rollback_connection.execute(
                text("UPDATE accounts SET balance = -1 WHERE id = :id"), {"id": account_id}
            )
        assert _constraint_name(caught.value) == "ck_accounts_no_overdraft"
        savepoint.rollback()
    # Inserting a new overdrawn user account is refused as well.
    with pytest.raises(IntegrityError) as caught, rollback_connection.begin_nested():
        rollback_connection.execute(
            text(
                "INSERT INTO accounts (user_id, currency, kind, balance) "
                "VALUES (:user, 'USD', 'user', -5)"
            ),
            {"user": alice.id},
        )
    assert _constraint_name(caught.value) == "ck_accounts_no_overdraft"
    assert balance_of(alice.accounts["USD"]) == 0


def test_external_account_may_go_negative(
    money: dict[str, CurrencyInfo], rollback_connection: Connection
) -> None:
    external = money["CNY"].external_account_id
    rollback_connection.execute(
        text("UPDATE accounts SET balance = -123456789 WHERE id = :id"), {"id": external}
    )
    assert (
        rollback_connection.scalar(
            text("SELECT balance FROM accounts WHERE id = :id"), {"id": external}
        )
        == -123456789
    )


# --- the sweeper --------------------------------------------------------------------------


def test_sweep_finds_a_transfer_that_never_got_a_doorbell(
    api: Api, money: dict[str, CurrencyInfo]
) -> None:
    alice, bob = api.funded("30.00", "CNY"), api.register()
    transfer_id = submit_without_doorbell(alice, alice.accounts["CNY"], bob.accounts["CNY"], "10")
    # Older than SWEEP_PENDING_AFTER (1 s in tests), and nobody rang for it.
    time.sleep(1.3)
    assert statuses([transfer_id]) == {transfer_id: "pending"}

    rang = sweep()
    assert rang.get("CNY", 0) >= 1
    assert wait_until_final([transfer_id]) == {transfer_id: "settled"}
    # 10.00 CNY at 2 %: 0.20 to CNY's commission account.
    assert [leg[1:4] for leg in postings_of([transfer_id])] == [
        (alice.accounts["CNY"], "debit", -1020),
        (bob.accounts["CNY"], "credit", 1000),
        (money["CNY"].commission_account_id, "commission", 20),
    ]
    assert balance_of(alice.accounts["CNY"]) == 3000 - 1020


def test_sweep_via_celery_apply_rings_for_old_pending_transfers(api: Api) -> None:
    alice, bob = api.funded("5.00", "EUR"), api.register()
    transfer_id = submit_without_doorbell(alice, alice.accounts["EUR"], bob.accounts["EUR"], "1")
    time.sleep(1.3)
    rang = sweep.apply().get()
    assert rang.get("EUR", 0) >= 1
    assert wait_until_final([transfer_id]) == {transfer_id: "settled"}


# --- the per-currency settlement lock -----------------------------------------------------


def test_settlement_lock_holds_settlers_off_then_applies_in_id_order(
    api: Api, money: dict[str, CurrencyInfo], deliver: Callable[..., None]
) -> None:
    usd = money["USD"]
    alice, bob = api.funded("10.00"), api.register()
    carol = api.funded("5.00", "EUR")
    source, target = alice.accounts["USD"], bob.accounts["USD"]

    with get_engine().connect() as holder:
        held = holder.begin()
        holder.execute(
            text("SELECT pg_advisory_xact_lock(:cls, hashtext('USD'))"),
            {"cls": SETTLEMENT_LOCK_CLASS},
        )
        # 6.06, then 5.05 (does not fit in what is left), then 3.03 (fits).
        ids = [
            submit_without_doorbell(alice, source, target, amount)
            for amount in ("6.00", "5.00", "3.00")
        ]
        eur_id = submit_without_doorbell(carol, carol.accounts["EUR"], bob.accounts["EUR"], "1")

        # The worker gets the doorbell and finds the lock taken...
        deliver("USD", ids)
        # ...so does a direct call, and the batch itself says so.
        assert settle("USD", ids) == {"settled": 0, "rejected": 0}
        with script_session() as session, session.begin():
            assert settle_batch(session, "USD", 500, usd.commission_account_id).claimed is None
        assert set(statuses(ids).values()) == {"pending"}
        assert balance_of(source) == 1000
        # The lock is per currency: EUR settles meanwhile.
        settle("EUR", [eur_id])
        assert wait_until_final([eur_id]) == {eur_id: "settled"}
        held.rollback()

    deliver("USD", ids)
    assert wait_until_final(ids) == dict(zip(ids, ["settled", "rejected", "settled"], strict=True))
    assert transfer_rows(ids)[ids[1]][1] == "insufficient_funds"
    assert balance_of(source) == 1000 - 606 - 303
    assert balance_of(target) == 900
    # balance_after shows the order: 10.00 -> 3.94 -> 0.91.
    debits = [leg[4] for leg in postings_of(ids) if leg[2] == "debit"]
    assert debits == [394, 91]


# --- conservation -------------------------------------------------------------------------


def _assert_ledger_invariants() -> None:
    """The double-entry invariants over the whole database, in one consistent snapshot."""
    with get_engine().connect() as connection:
        # Connection.execution_options changes this connection in place.
        connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            sums = connection.execute(
                text("SELECT currency, sum(balance) FROM accounts GROUP BY currency")
            ).all()
            assert {currency for currency, _ in sums} == {"CNY", "EUR", "USD"}
            assert all(total == 0 for _, total in sums), sums

            drift = connection.execute(
                text(
                    "SELECT a.id, a.balance, coalesce(sum(p.amount), 0) FROM accounts a "
                    "LEFT JOIN postings p ON p.account_id = a.id GROUP BY a.id "
                    "HAVING a.balance <> coalesce(sum(p.amount), 0)"
                )
            ).all()
            assert drift == [], "balance differs from the sum of its postings"

            per_transfer = connection.execute(
                text(
                    "SELECT t.id, t.status, t.commission, count(p.id), "
                    "coalesce(sum(p.amount), 0), bool_and(a.currency = t.currency) "
                    "FROM transfers t LEFT JOIN postings p ON p.transfer_id = t.id "
                    "LEFT JOIN accounts a ON a.id = p.account_id GROUP BY t.id"
                )
            ).all()
            for transfer_id, status, commission, legs, total, same_currency in per_transfer:
                if status == "settled":
                    assert total == 0, transfer_id
                    assert legs == (3 if commission else 2), transfer_id
                    assert same_currency, transfer_id
                else:
                    assert legs == 0, (transfer_id, status)

            broken_chain = connection.execute(
                text(
                    "SELECT id FROM (SELECT id, balance_after, sum(amount) OVER "
                    "(PARTITION BY account_id ORDER BY id) AS running FROM postings) AS p "
                    "WHERE balance_after <> running"
                )
            ).all()
            assert broken_chain == [], "balance_after does not chain in posting order"


@pytest.mark.parametrize("seed", [20261127, 7301])
def test_money_is_conserved_after_a_random_workload(
    api: Api, money: dict[str, CurrencyInfo], seed: int
) -> None:
    rnd = random.Random(seed)
    users = [api.register() for _ in range(4)]
    extra = open_account(api, users[0], "USD")
    owner: dict[int, int] = {extra: users[0].id}
    by_currency: dict[str, list[int]] = defaultdict(list)
    by_currency["USD"].append(extra)
    for user in users:
        for currency, account_id in user.accounts.items():
            owner[account_id] = user.id
            by_currency[currency].append(account_id)

    # (id, kind, currency, source, target, amount, commission)
    submitted: list[tuple[int, str, str, int, int, int, int]] = []
    for _ in range(60):
        currency = rnd.choice(["USD", "USD", "EUR", "CNY"])
        row = money[currency]
        if rnd.random() < 0.3:
            target = rnd.choice(by_currency[currency])
            minor = rnd.randint(1, 5000)
            body = api.deposit(target, format_amount(minor, row.decimals))
            submitted.append(
                (body["id"], "deposit", currency, row.external_account_id, target, minor, 0)
            )
            continue
        source = rnd.choice(by_currency[currency])
        # Any other user account of the currency (the house accounts take no transfers).
        target = rnd.choice([a for a in by_currency[currency] if a != source])
        minor = rnd.randint(1, 3000)
        payer = next(u for u in users if u.id == owner[source])
        response = api.transfer(payer, source, target, format_amount(minor, row.decimals))
        assert response.status_code == 202, response.get_json()
        body = response.get_json()
        same_user = owner.get(target) == owner[source]
        commission = 0 if same_user else ceil_commission(minor, row.commission_rate)
        assert body["commission"] == format_amount(commission, row.decimals)
        submitted.append((body["id"], "transfer", currency, source, target, minor, commission))

    ids = [entry[0] for entry in submitted]
    final = wait_until_final(ids)

    # The expected outcome: sequential, in id order (settlement is deterministic).
    expected_balance: dict[int, int] = defaultdict(int)
    expected_status = {}
    commission_income: dict[str, int] = defaultdict(int)
    for transfer_id, kind, currency, source, target, minor, commission in sorted(submitted):
        if kind == "transfer" and expected_balance[source] < minor + commission:
            expected_status[transfer_id] = "rejected"
            continue
        expected_status[transfer_id] = "settled"
        if kind == "transfer":
            expected_balance[source] -= minor + commission
        expected_balance[target] += minor
        commission_income[currency] += commission
    assert final == expected_status
    assert "rejected" in final.values()
    assert "settled" in final.values()

    for account_id in owner:
        assert balance_of(account_id) == expected_balance[account_id], account_id
    for currency, row in money.items():
        ours = [t for t in submitted if t[2] == currency and final[t[0]] == "settled"]
        received = sum(
            amount
            for _, account_id, leg, amount, _ in postings_of([t[0] for t in ours])
            if account_id == row.commission_account_id and leg == "commission"
        )
        assert received == commission_income[currency]
    _assert_ledger_invariants()


def test_ledger_invariants_hold_over_everything_settled_so_far(
    settlement_worker: Any,
) -> None:
    _assert_ledger_invariants()


# --- retrying real database failures ------------------------------------------------------


@pytest.fixture
def scratch_user_ids() -> list[int]:
    """Two users with no accounts: rows to fight over without touching any money."""
    names = [f"retry_{time.monotonic_ns()}_{n}" for n in range(2)]
    with script_session() as session, session.begin():
        return [
            session.scalar(
                text(
                    "INSERT INTO users (username, password_hash) VALUES (:name, '!') RETURNING id"
                ),
                {"name": name},
            )
            for name in names
        ]


def _full_name(user_id: int) -> str:
    return scalar("SELECT full_name FROM users WHERE id = :id", id=user_id)


def _read_then_write(user_id: int, interfere: bool) -> str:
    """A REPEATABLE READ read-modify-write; `interfere` commits a concurrent write between."""
    engine = get_engine()
    with engine.connect() as connection:
        # Connection.execution_options changes this connection in place.
        connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            seen = connection.scalar(
                text("SELECT full_name FROM users WHERE id = :id"), {"id": user_id}
            )
            if interfere:
                with engine.begin() as other:
                    other.execute(
                        text("UPDATE users SET full_name = full_name || 'x' WHERE id = :id"),
                        {"id": user_id},
                    )
            connection.execute(
                text("UPDATE users SET full_name = :name WHERE id = :id"),
                {"name": seen + "+mine", "id": user_id},
            )
            return seen


def test_retrying_reruns_work_after_a_real_serialization_failure(
    scratch_user_ids: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    user_id = scratch_user_ids[0]
    calls: list[int] = []

    def work() -> str:
        calls.append(1)
        return _read_then_write(user_id, interfere=len(calls) == 1)

    assert retrying(work) == "x"
    assert len(calls) == 2
    assert "could not serialize access" in caplog.text
    # The concurrent write was not lost: the retry read it and built on it.
    assert _full_name(user_id) == "x+mine"


def test_retrying_gives_up_after_its_attempts(scratch_user_ids: list[int]) -> None:
    user_id = scratch_user_ids[0]
    calls: list[int] = []

    def work() -> str:
        calls.append(1)
        return _read_then_write(user_id, interfere=True)

    with pytest.raises(OperationalError) as caught:
        retrying(work, attempts=3)
    assert caught.value.orig.sqlstate == "40001"  # type: ignore[union-attr]
    assert len(calls) == 3
    assert _full_name(user_id) == "xxx"


def test_retrying_reruns_work_after_a_real_deadlock(
    scratch_user_ids: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = scratch_user_ids
    barrier = threading.Barrier(2, timeout=15)
    attempts: dict[str, int] = defaultdict(int)

    def locker(name: str, one: int, other: int) -> Callable[[], str]:
        def work() -> str:
            attempts[name] += 1
            with get_engine().begin() as connection:
                update = text("UPDATE users SET full_name = full_name || :tag WHERE id = :id")
                connection.execute(update, {"tag": name, "id": one})
                if attempts[name] == 1:
                    # Both hold their first row before asking for the other's.
                    barrier.wait()
                connection.execute(update, {"tag": name, "id": other})
            return name

        return work

    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(retrying, locker("a", first, second))
        b = pool.submit(retrying, locker("b", second, first))
        assert (a.result(timeout=30), b.result(timeout=30)) == ("a", "b")
    # PostgreSQL aborted exactly one of them; that one ran again and both committed.
    assert sorted(attempts.values()) == [1, 2]
    assert "deadlock detected" in caplog.text
    assert sorted(_full_name(first)) == ["a", "b"]
    assert sorted(_full_name(second)) == ["a", "b"]


def test_retrying_reruns_work_when_a_lock_is_not_available(scratch_user_ids: list[int]) -> None:
    user_id = scratch_user_ids[0]
    holder = get_engine().connect()
    held = holder.begin()
    holder.execute(text("SELECT 1 FROM users WHERE id = :id FOR UPDATE"), {"id": user_id})
    calls: list[int] = []

    def work() -> int:
        calls.append(1)
        with get_engine().begin() as connection:
            try:
                return connection.scalar(
                    text("SELECT id FROM users WHERE id = :id FOR UPDATE NOWAIT"),
                    {"id": user_id},
                )
            finally:
                if held.is_active:
                    # The first attempt failed on the held lock (55P03); free it for the retry.
                    held.rollback()

    try:
        assert retrying(work) == user_id
    finally:
        holder.close()
    assert len(calls) == 2


def test_retrying_gives_up_at_once_on_other_errors(scratch_user_ids: list[int]) -> None:
    calls: list[str] = []

    def duplicate_key() -> None:
        calls.append("duplicate")
        with get_engine().begin() as connection:
            connection.execute(
                text("INSERT INTO users (id, username, password_hash) VALUES (:id, 'dup', '!')"),
                {"id": scratch_user_ids[0]},
            )

    def timeout() -> None:
        calls.append("timeout")
        with get_engine().begin() as connection:
            connection.execute(text("SET LOCAL statement_timeout = 20"))
            connection.execute(text("SELECT pg_sleep(2)"))

    def division() -> None:
        calls.append("division")
        with get_engine().begin() as connection:
            connection.execute(text("SELECT 1 / 0"))

    def plain_bug() -> None:
        calls.append("bug")
        raise ValueError("not a database error")

    with pytest.raises(IntegrityError):
        retrying(duplicate_key)
    # A query cancelled by statement_timeout is an OperationalError, but not a retryable one.
    with pytest.raises(OperationalError) as caught:
        retrying(timeout)
    assert caught.value.orig.sqlstate == "57014"  # type: ignore[union-attr]
    with pytest.raises(DBAPIError):
        retrying(division)
    with pytest.raises(ValueError, match="not a database error"):
        retrying(plain_bug)
    assert calls == ["duplicate", "timeout", "division", "bug"]
