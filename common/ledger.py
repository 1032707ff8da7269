"""Settlement: the pure rules (plan_batch) and the transaction that applies them.

A batch is every claimable pending transfer of one currency, up to a limit,
applied in id order inside one transaction:

1. take the currency's settlement lock (pg_try_advisory_xact_lock): one settler
   per currency at a time, so batches apply in id order and the hot commission
   account is locked once per batch instead of once per transfer;
2. claim pending transfers, oldest first (FOR UPDATE SKIP LOCKED);
3. lock every account involved in one statement ordered by id (no deadlock);
4. decide each transfer in id order against running balances (plan_batch);
5. write postings, balances and statuses in three bulk statements; commit.

A doorbell for a transfer that is already final finds nothing to claim and
changes nothing; the unique (transfer_id, leg) constraint on postings is the
database's own guard against applying a transfer twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.orm import Session

from common.db import is_retryable, retrying  # noqa: F401 - re-exported for callers
from common.models import AccountKind, PostingLeg, TransferStatus

log = logging.getLogger(__name__)

# Namespace of the advisory locks this module takes (the other key is the currency).
SETTLEMENT_LOCK_CLASS = 7301

INSUFFICIENT_FUNDS = "insufficient_funds"
BALANCE_LIMIT = "balance_limit"
# BIGINT: a credit that would overflow the column is refused, not crashed on.
MAX_BALANCE = 2**63 - 1


@dataclass(frozen=True)
class PendingTransfer:
    id: int
    from_account_id: int
    to_account_id: int
    amount: int
    commission: int


@dataclass
class AccountState:
    id: int
    kind: str
    balance: int


@dataclass(frozen=True)
class PlannedPosting:
    transfer_id: int
    account_id: int
    leg: PostingLeg
    amount: int
    balance_after: int


@dataclass(frozen=True)
class Decision:
    transfer_id: int
    status: TransferStatus
    reason: str | None = None


@dataclass
class Plan:
    decisions: list[Decision] = field(default_factory=list)
    postings: list[PlannedPosting] = field(default_factory=list)
    # Final balance of every account whose balance changed.
    balances: dict[int, int] = field(default_factory=dict)


def plan_batch(
    transfers: Sequence[PendingTransfer],
    accounts: dict[int, AccountState],
    commission_account_id: int,
) -> Plan:
    """Decide a batch in id order against running balances. Pure: no I/O.

    The payer pays amount + commission, the payee receives amount, the
    commission account receives the commission. Only external accounts may go
    below zero.
    """
    plan = Plan()
    running = {account_id: state.balance for account_id, state in accounts.items()}
    for transfer in sorted(transfers, key=lambda t: t.id):
        payer = accounts[transfer.from_account_id]
        debit = transfer.amount + transfer.commission
        legs = [
            (PostingLeg.DEBIT, transfer.from_account_id, -debit),
            (PostingLeg.CREDIT, transfer.to_account_id, transfer.amount),
        ]
        if transfer.commission:
            legs.append((PostingLeg.COMMISSION, commission_account_id, transfer.commission))
        if payer.kind != AccountKind.EXTERNAL and running[payer.id] < debit:
            plan.decisions.append(
                Decision(transfer.id, TransferStatus.REJECTED, INSUFFICIENT_FUNDS)
            )
            continue
        after: dict[int, int] = {}
        postings = []
        for leg, account_id, amount in legs:
            # The payee may be the commission account itself: legs on one account add up.
            after[account_id] = after.get(account_id, running[account_id]) + amount
            postings.append(PlannedPosting(transfer.id, account_id, leg, amount, after[account_id]))
        if any(abs(balance) > MAX_BALANCE for balance in after.values()):
            plan.decisions.append(Decision(transfer.id, TransferStatus.REJECTED, BALANCE_LIMIT))
            continue
        running.update(after)
        plan.balances.update(after)
        plan.postings.extend(postings)
        plan.decisions.append(Decision(transfer.id, TransferStatus.SETTLED))
    return plan


@dataclass(frozen=True)
class BatchResult:
    currency: str
    # None when another settler held the currency's lock: it will see our work.
    claimed: int | None
    settled: int = 0
    rejected: int = 0
    settled_ids: tuple[int, ...] = ()
    final_ids: tuple[int, ...] = ()


def _claim(session: Session, currency: str, limit: int) -> list[PendingTransfer]:
    rows = session.execute(
        text(
            "SELECT id, from_account_id, to_account_id, amount, commission FROM transfers "
            "WHERE currency = :currency AND status = 'pending' "
            "ORDER BY id LIMIT :limit FOR NO KEY UPDATE SKIP LOCKED"
        ),
        {"currency": currency, "limit": limit},
    )
    return [PendingTransfer(*row) for row in rows]


def _lock_accounts(session: Session, account_ids: Iterable[int]) -> dict[int, AccountState]:
    # One statement, ordered by id: every settler locks accounts in the same order.
    # NO KEY UPDATE, not UPDATE: a new transfer's foreign-key check takes KEY SHARE
    # on its accounts, which FOR UPDATE would block (and deadlock with, since the
    # web locks from/to in request order while settlement locks in id order).
    rows = session.execute(
        text(
            "SELECT id, kind, balance FROM accounts WHERE id = ANY(CAST(:ids AS bigint[])) "
            "ORDER BY id FOR NO KEY UPDATE"
        ),
        {"ids": sorted(set(account_ids))},
    )
    return {row.id: AccountState(row.id, row.kind, row.balance) for row in rows}


def _apply(session: Session, plan: Plan) -> None:
    if plan.postings:
        session.execute(
            text(
                "INSERT INTO postings (transfer_id, account_id, leg, amount, balance_after) "
                "SELECT * FROM unnest(CAST(:transfer_ids AS bigint[]), "
                "CAST(:account_ids AS bigint[]), CAST(:legs AS text[]), "
                "CAST(:amounts AS bigint[]), CAST(:balances AS bigint[]))"
            ),
            {
                "transfer_ids": [p.transfer_id for p in plan.postings],
                "account_ids": [p.account_id for p in plan.postings],
                "legs": [p.leg.value for p in plan.postings],
                "amounts": [p.amount for p in plan.postings],
                "balances": [p.balance_after for p in plan.postings],
            },
        )
    if plan.balances:
        session.execute(
            text(
                "UPDATE accounts SET balance = v.balance FROM unnest("
                "CAST(:ids AS bigint[]), CAST(:balances AS bigint[])) AS v(id, balance) "
                "WHERE accounts.id = v.id"
            ),
            {"ids": list(plan.balances), "balances": list(plan.balances.values())},
        )
    session.execute(
        text(
            "UPDATE transfers SET status = v.status, reason = v.reason, "
            "settled_at = CASE WHEN v.status = 'settled' THEN statement_timestamp() END, "
            "attempts = attempts + 1, last_error = NULL "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), "
            "CAST(:reasons AS text[])) AS v(id, status, reason) "
            "WHERE transfers.id = v.id AND transfers.status = 'pending'"
        ),
        {
            "ids": [d.transfer_id for d in plan.decisions],
            "statuses": [d.status.value for d in plan.decisions],
            "reasons": [d.reason for d in plan.decisions],
        },
    )


def settle_batch(
    session: Session, currency: str, limit: int, commission_account_id: int
) -> BatchResult:
    """Settle up to `limit` pending transfers of `currency` in the session's transaction.

    The caller commits. Returns claimed=None without touching anything when
    another settler holds the currency's lock.
    """
    locked = session.scalar(
        text("SELECT pg_try_advisory_xact_lock(:cls, hashtext(:currency))"),
        {"cls": SETTLEMENT_LOCK_CLASS, "currency": currency},
    )
    if not locked:
        return BatchResult(currency, claimed=None)
    transfers = _claim(session, currency, limit)
    if not transfers:
        return BatchResult(currency, claimed=0)
    account_ids = {commission_account_id}
    for transfer in transfers:
        account_ids.update((transfer.from_account_id, transfer.to_account_id))
    accounts = _lock_accounts(session, account_ids)
    plan = plan_batch(transfers, accounts, commission_account_id)
    _apply(session, plan)
    settled = tuple(d.transfer_id for d in plan.decisions if d.status == TransferStatus.SETTLED)
    return BatchResult(
        currency,
        claimed=len(transfers),
        settled=len(settled),
        rejected=len(plan.decisions) - len(settled),
        settled_ids=settled,
        final_ids=tuple(d.transfer_id for d in plan.decisions),
    )


def pending_exists(session: Session, currency: str) -> bool:
    return bool(
        session.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM transfers "
                "WHERE currency = :currency AND status = 'pending')"
            ),
            {"currency": currency},
        )
    )
