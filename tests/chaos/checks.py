"""Checks of the ledger against what the clients were told, shared by the chaos suite
and the multi-host suite (tests/multihost): the same invariants after any fault."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.chaos.harness import Stack
from tests.chaos.load import SUPERUSER_AUTH, ApiClient, Recorder, Submitted, User, minor_units


def fund(stack: Stack, users: list[User], recorder: Recorder, funding: dict[str, str]) -> list[int]:
    """Deposits of `funding` (currency -> amount) to every user: their transfer ids."""

    def deposit(user: User) -> list[int]:
        client = ApiClient(stack.base_url, recorder, SUPERUSER_AUTH)
        ids = []
        try:
            for currency, amount in funding.items():
                response = client.request(
                    "POST",
                    f"/accounts/{user.accounts[currency]}/deposits",
                    route="deposit",
                    data={"amount": amount},
                    headers={"Idempotency-Key": f"fund-{user.id}-{currency}"},
                )
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
        finally:
            client.close()
        return ids

    with ThreadPoolExecutor(10) as pool:
        return [i for ids in pool.map(deposit, users) for i in ids]


# Holds the settler still has work on: a reservation to make, a void to apply, an expiry.
HOLDS_OUTSTANDING = (
    "SELECT count(*) FROM holds WHERE status = 'pending'"
    " OR (status = 'held' AND void_requested_at IS NOT NULL)"
    # Past its expiry with no capture asked: beat's sweep has it expired within seconds.
    " OR (status = 'held' AND transfer_id IS NULL AND expires_at <= now())"
)


def drain(stack: Stack, bound_s: float) -> tuple[float, dict[str, int]]:
    """Wait until nothing is pending or failed and no hold has work left (bounded): the
    seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        counts = stack.status_counts()
        if not counts.get("pending") and not counts.get("failed"):
            with stack.pg.connect(stack.database) as connection:
                if not connection.execute(HOLDS_OUTSTANDING).fetchone()[0]:
                    break
        time.sleep(0.25)
    return time.monotonic() - started, stack.status_counts()


def check_holds(
    holds: dict[int, tuple[Any, ...]], accepted: list[tuple[int, str, int]]
) -> list[str]:
    """Every accepted hold exists as asked, with no work left; no hold no client was given."""
    problems = []
    for maker, key, hold_id in accepted:
        row = holds.get(hold_id)
        if row is None:
            problems.append(f"accepted hold {hold_id} ({key}) does not exist")
            continue
        _, status, requested_by, idempotency_key, void_requested = row
        if (requested_by, idempotency_key) != (maker, key):
            problems.append(f"hold {hold_id} differs from its request: {row}")
        if status == "pending" or (status == "held" and void_requested):
            problems.append(f"hold {hold_id} still has work: {row}")
    unexplained = sorted(set(holds) - {hold_id for _, _, hold_id in accepted})
    if unexplained:
        problems.append(f"holds no client was given: {unexplained[:20]}")
    return problems


def check_transfers(
    transfers: dict[int, tuple[Any, ...]], accepted: list[Submitted], funding_ids: list[int]
) -> list[str]:
    """Every 202 exists, is final (failed only with a reason) and is what was asked for;
    nothing exists that no client was given; one transfer per idempotency key."""
    problems = check_accepted(transfers, accepted)
    given = {item.transfer_id for item in accepted} | set(funding_ids)
    unexplained = sorted(set(transfers) - given)
    if unexplained:
        problems.append(f"transfers no client was given: {unexplained[:20]}")
    return problems + check_keys(transfers)


def check_accepted(transfers: dict[int, tuple[Any, ...]], accepted: list[Submitted]) -> list[str]:
    """Every 202 in `accepted` exists, is final (failed only with a reason) and is what
    was asked for."""
    problems = []
    for item in accepted:
        row = transfers.get(item.transfer_id)
        if row is None:
            problems.append(f"accepted transfer {item.transfer_id} ({item.key}) does not exist")
            continue
        _, status, reason, source, target, amount, _, _, requested_by, key = row
        if status not in ("settled", "rejected", "failed") or (status == "failed" and not reason):
            problems.append(f"transfer {item.transfer_id} is {status} (reason {reason})")
        asked = (item.requested_by, item.key, item.to_account, minor_units(item.amount))
        if (requested_by, key, target, amount) != asked or (
            item.route != "deposit" and source != item.from_account
        ):
            problems.append(f"transfer {item.transfer_id} differs from its request: {row} {item}")
    return problems


def check_keys(transfers: dict[int, tuple[Any, ...]]) -> list[str]:
    """No idempotency key names two transfers of the same client."""
    keys = Counter((row[8], row[9]) for row in transfers.values() if row[9] is not None)
    return [f"key {key} used by {n} transfers" for key, n in keys.items() if n > 1]


def check_replay(
    transfers: dict[int, tuple[Any, ...]],
    commission_accounts: dict[str, int],
    balances: dict[int, int],
) -> list[str]:
    """Each balance equals the sequential replay of the settled transfers in id order,
    from zero: deposits and credits in, debits (amount + commission) out."""
    replay: dict[int, int] = defaultdict(int)
    for row in sorted(transfers.values()):
        if row[1] != "settled":
            continue
        _, _, _, source, target, amount, commission, currency, _, _ = row
        replay[source] -= amount + commission
        replay[target] += amount
        replay[commission_accounts[currency]] += commission
    return [
        f"account {account_id}: balance {balance}, replay {replay.get(account_id, 0)}"
        for account_id, balance in sorted(balances.items())
        if balance != replay.get(account_id, 0)
    ]


def read_ledger(
    stack: Stack,
) -> tuple[
    dict[int, tuple[Any, ...]],
    dict[str, int],
    dict[int, int],
    dict[int, tuple[Any, ...]],
    list[Any],
]:
    """Transfers, commission accounts by currency, balances, holds and the first stuck
    transfers, straight from the database."""
    with stack.pg.connect(stack.database) as connection:
        transfers = {
            row[0]: row
            for row in connection.execute(
                "SELECT id, status, reason, from_account_id, to_account_id, amount, commission, "
                "currency, requested_by, idempotency_key FROM transfers ORDER BY id"
            )
        }
        commission_accounts = dict(
            connection.execute("SELECT code, commission_account_id FROM currencies").fetchall()
        )
        balances = dict(connection.execute("SELECT id, balance FROM accounts").fetchall())
        holds = {
            row[0]: row
            for row in connection.execute(
                "SELECT id, status, requested_by, idempotency_key, void_requested_at IS NOT NULL"
                " FROM holds ORDER BY id"
            )
        }
        stuck = connection.execute(
            "SELECT id, status, attempts, next_attempt_at, last_error FROM transfers "
            "WHERE status IN ('pending', 'failed') ORDER BY id LIMIT 10"
        ).fetchall()
    return transfers, commission_accounts, balances, holds, stuck


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return (
        f"{values[len(values) // 2]:.3f} / {values[int(len(values) * 0.99)]:.3f} / {values[-1]:.3f}"
    )
