"""Settlement: the pure rules (plan_batch) and the transaction that applies them.

A batch is every claimable pending transfer of one currency, up to a limit,
applied in id order inside one transaction:

1. take the currency's settlement lock (pg_try_advisory_xact_lock): one settler
   per currency at a time, so batches apply in id order and the hot commission
   account is locked once per batch instead of once per transfer;
2. claim pending transfers, oldest first (FOR UPDATE SKIP LOCKED);
3. lock every account involved in one statement ordered by id (no deadlock);
4. decide each transfer in id order against running balances (plan_batch);
5. write postings, balances, statuses, and the outcomes' events and webhook deliveries
   (common.events) in one statement of bulk CTEs; commit.

A doorbell for a transfer that is already final finds nothing to claim and
changes nothing; the unique (transfer_id, leg) constraint on postings is the
database's own guard against applying a transfer twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from psycopg.rows import args_row, tuple_row
from sqlalchemy import text
from sqlalchemy.orm import Session

from common import events
from common.db import execute_direct
from common.limits import BIGINT_MAX
from common.models import SETTLEMENT_ERROR, AccountKind, PostingLeg, TransferStatus

log = logging.getLogger(__name__)

# Namespace of the advisory locks this module takes (the other key is the currency).
SETTLEMENT_LOCK_CLASS = 7301

INSUFFICIENT_FUNDS = "insufficient_funds"
BALANCE_LIMIT = "balance_limit"
# BIGINT: a credit that would overflow the column is refused, not crashed on.
MAX_BALANCE = BIGINT_MAX


@dataclass(frozen=True)
class PendingTransfer:
    id: int
    from_account_id: int
    to_account_id: int
    amount: int
    commission: int
    request_id: str | None = None
    # Seconds since it was accepted, when claimed (for the settlement latency metric).
    age_s: float = 0.0


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
    decisions: tuple[Decision, ...] = ()
    # When the batch's settled transfers were settled (their settled_at).
    settled_at: datetime | None = None
    # transfer id -> the request id it was accepted under, for the settlement log.
    request_ids: dict[int, str | None] = field(default_factory=dict)
    ages_s: dict[int, float] = field(default_factory=dict)
    # Webhook deliveries written with the batch's events: to publish after commit.
    deliveries: tuple[int, ...] = ()


# Pending and not backing off after a failed attempt.
_DUE = "status = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= now())"


_CLAIM = text(
    "SELECT id, from_account_id, to_account_id, amount, commission, request_id, "
    "extract(epoch FROM clock_timestamp() - created_at)::float8 "
    f"FROM transfers WHERE currency = :currency AND {_DUE} "
    "ORDER BY id LIMIT :limit FOR NO KEY UPDATE SKIP LOCKED"
)


_PENDING_ROWS = args_row(PendingTransfer)


def _claim(session: Session, currency: str, limit: int) -> list[PendingTransfer]:
    params = {"currency": currency, "limit": limit}
    return execute_direct(session, _CLAIM, params, _PENDING_ROWS).fetchall()


_ACCOUNT_ROWS = args_row(AccountState)
_LOCK_ACCOUNTS = text(
    "SELECT id, kind, balance FROM accounts WHERE id = ANY(CAST(:ids AS bigint[])) "
    "ORDER BY id FOR NO KEY UPDATE"
)


def _lock_accounts(session: Session, account_ids: Iterable[int]) -> dict[int, AccountState]:
    # One statement, ordered by id: every settler locks accounts in the same order.
    # NO KEY UPDATE, not UPDATE: a new transfer's foreign-key check takes KEY SHARE
    # on its accounts, which FOR UPDATE would block (and deadlock with, since the
    # web locks from/to in request order while settlement locks in id order).
    params = {"ids": sorted(set(account_ids))}
    rows = execute_direct(session, _LOCK_ACCOUNTS, params, _ACCOUNT_ROWS)
    return {row.id: row for row in rows}


# The writes of a batch in one statement (data-modifying CTEs), whatever the batch's
# size: postings, balances, the transfers' statuses, and the events and webhook
# deliveries of the transfers decided. One round trip instead of five: at low rates a
# batch is a transfer or two, and its round trips are most of the settler's work.
_APPLY = text(
    "WITH posted AS ("
    # A batch's postings are stamped with its transfers' settled_at (statement_timestamp(),
    # not the column default's clock_timestamp()): the balance at a transfer's settled_at
    # then includes it (GET /accounts/{id}?at=, docs/decisions/0035).
    " INSERT INTO postings (transfer_id, account_id, leg, amount, balance_after, created_at)"
    " SELECT *, statement_timestamp() FROM unnest(CAST(:posting_transfer_ids AS bigint[]),"
    " CAST(:posting_account_ids AS bigint[]), CAST(:posting_legs AS text[]),"
    " CAST(:posting_amounts AS bigint[]), CAST(:posting_balances AS bigint[]))"
    "), balanced AS ("
    " UPDATE accounts SET balance = v.balance FROM unnest("
    " CAST(:account_ids AS bigint[]), CAST(:account_balances AS bigint[])) AS v(id, balance)"
    " WHERE accounts.id = v.id"
    "), decided AS ("
    " UPDATE transfers SET status = v.status, reason = v.reason,"
    " settled_at = CASE WHEN v.status = 'settled' THEN statement_timestamp() END,"
    " attempts = attempts + 1, last_error = NULL"
    " FROM unnest(CAST(:transfer_ids AS bigint[]), CAST(:statuses AS text[]),"
    " CAST(:reasons AS text[])) AS v(id, status, reason)"
    " WHERE transfers.id = v.id AND transfers.status = 'pending'"
    " RETURNING transfers.id, transfers.status, transfers.from_user_id, transfers.to_user_id"
    # Their events and webhook deliveries, in the same statement (common.events).
    "), " + events.TRANSFER_EVENTS + " "
    # The settled_at of every transfer settled here, for the announcement; the
    # deliveries to publish after commit.
    "SELECT statement_timestamp() AS settled_at, " + events.DELIVERY_IDS
)


def _apply(session: Session, plan: Plan) -> tuple[datetime, tuple[int, ...]]:
    """Write the plan; returns the settled_at of the transfers it settled and the ids
    of the webhook deliveries written."""
    cursor = execute_direct(
        session,
        _APPLY,
        {
            "posting_transfer_ids": [p.transfer_id for p in plan.postings],
            "posting_account_ids": [p.account_id for p in plan.postings],
            "posting_legs": [p.leg.value for p in plan.postings],
            "posting_amounts": [p.amount for p in plan.postings],
            "posting_balances": [p.balance_after for p in plan.postings],
            "account_ids": list(plan.balances),
            "account_balances": list(plan.balances.values()),
            "transfer_ids": [d.transfer_id for d in plan.decisions],
            "statuses": [d.status.value for d in plan.decisions],
            "reasons": [d.reason for d in plan.decisions],
        },
        tuple_row,
    )
    row = cursor.fetchone()
    assert row is not None  # the statement's SELECT returns one row
    settled_at: datetime = row[0]
    return settled_at, tuple(row[1])


def settle_batch(
    session: Session,
    currency: str,
    limit: int,
    commission_account_id: int,
    on_locked: Callable[[], object] | None = None,
) -> BatchResult:
    """Settle up to `limit` pending transfers of `currency` in the session's transaction.

    The caller commits. Returns claimed=None without touching anything when
    another settler holds the currency's lock.

    `on_locked` runs once the lock is held and before the claim, inside the
    transaction (the settler clears its doorbell marks there): it must be quick and
    must not raise (docs/decisions/0017).
    """
    if not _try_settlement_lock(session, currency):
        return BatchResult(currency, claimed=None)
    if on_locked is not None:
        # Between taking the lock and claiming: whatever it clears, the claim still sees.
        on_locked()
    transfers = _claim(session, currency, limit)
    if not transfers:
        return BatchResult(currency, claimed=0)
    account_ids = {commission_account_id}
    for transfer in transfers:
        account_ids.update((transfer.from_account_id, transfer.to_account_id))
    accounts = _lock_accounts(session, account_ids)
    plan = plan_batch(transfers, accounts, commission_account_id)
    settled_at, deliveries = _apply(session, plan)
    settled = tuple(d.transfer_id for d in plan.decisions if d.status == TransferStatus.SETTLED)
    return BatchResult(
        currency,
        claimed=len(transfers),
        settled=len(settled),
        rejected=len(plan.decisions) - len(settled),
        decisions=tuple(plan.decisions),
        settled_at=settled_at,
        request_ids={t.id: t.request_id for t in transfers},
        ages_s={t.id: t.age_s for t in transfers},
        deliveries=deliveries,
    )


_SETTLEMENT_LOCK = text("SELECT pg_try_advisory_xact_lock(:cls, hashtext(:currency))")


def _try_settlement_lock(session: Session, currency: str) -> bool:
    # Held until the transaction ends; one settler per currency at a time.
    params = {"cls": SETTLEMENT_LOCK_CLASS, "currency": currency}
    row = execute_direct(session, _SETTLEMENT_LOCK, params, tuple_row).fetchone()
    return row is not None and bool(row[0])


@dataclass(frozen=True)
class FailedAttempt:
    transfer_id: int
    attempts: int
    # True when this attempt used up the budget and the transfer is now `failed`.
    failed: bool
    age_s: float = 0.0
    # Webhook deliveries of its transfer.failed event: to publish after commit.
    deliveries: tuple[int, ...] = ()


def record_failed_attempt(
    session: Session,
    currency: str,
    error: str,
    *,
    max_attempts: int,
    retry_failed_after_s: float,
) -> FailedAttempt | None:
    """Charge a failed settlement attempt to the currency's oldest due transfer.

    Called after a batch of one failed: that transfer is the one that cannot be
    settled now. It backs off exponentially (other transfers proceed meanwhile);
    past `max_attempts` it becomes `failed` with a reason (its `transfer.failed`
    event written by the same statement), and beat reopens it on its schedule.
    Returns None when there was nothing to charge or another settler holds the lock.
    """
    if not _try_settlement_lock(session, currency):
        return None
    row = session.execute(
        _CHARGE_FAILED_ATTEMPT,
        {
            "error": error[:2000],
            "max": max_attempts,
            "reason": SETTLEMENT_ERROR,
            "retry_after": retry_failed_after_s,
            "currency": currency,
        },
    ).one_or_none()
    if row is None:
        return None
    failed = row.status == TransferStatus.FAILED
    return FailedAttempt(row.id, row.attempts, failed, row.age_s, tuple(row.deliveries))


# The attempt, and when it used up the budget the transfer.failed event and its webhook
# deliveries, in one statement as settlement writes its own (common.events).
_CHARGE_FAILED_ATTEMPT = text(
    "WITH decided AS ("
    " UPDATE transfers SET attempts = attempts + 1, last_error = :error,"
    " status = CASE WHEN attempts + 1 >= :max THEN 'failed' ELSE 'pending' END,"
    " reason = CASE WHEN attempts + 1 >= :max THEN :reason END,"
    " next_attempt_at = now() + CASE WHEN attempts + 1 >= :max"
    "  THEN make_interval(secs => :retry_after)"
    "  ELSE make_interval(secs => least(power(2, attempts), 60)) END"
    " WHERE id = (SELECT id FROM transfers"
    f"  WHERE currency = :currency AND {_DUE} ORDER BY id LIMIT 1)"
    " RETURNING id, attempts, status, from_user_id, to_user_id,"
    " extract(epoch FROM clock_timestamp() - created_at)::float8 AS age_s"
    "), " + events.TRANSFER_EVENTS + " "
    "SELECT id, attempts, status, age_s, " + events.DELIVERY_IDS + " AS deliveries FROM decided"
)


def currencies_due(session: Session, pending_for_s: float) -> dict[str, int]:
    """Currencies with transfers due and pending longer than a doorbell should take."""
    rows = session.execute(
        text(
            f"SELECT currency, count(*) FROM transfers WHERE {_DUE} "
            "AND created_at < clock_timestamp() - make_interval(secs => :age) "
            "GROUP BY currency ORDER BY currency"
        ),
        {"age": pending_for_s},
    )
    return {row.currency: row[1] for row in rows}


def reopen_failed(session: Session, window_s: float) -> list[tuple[int, str]]:
    """Beat's retry of failed transfers: those due and still inside their retry window
    go back to pending (keeping their attempt count, so one more failure fails them
    again). Returns (id, currency) of each reopened transfer."""
    rows = session.execute(
        text(
            "UPDATE transfers SET status = 'pending', reason = NULL "
            "WHERE status = 'failed' AND next_attempt_at <= now() "
            "AND created_at > now() - make_interval(secs => :window) "
            "RETURNING id, currency"
        ),
        {"window": window_s},
    )
    return [(row.id, row.currency) for row in rows]


def requeue_failed(session: Session, transfer_ids: Sequence[int]) -> list[tuple[int, str]]:
    """The operator's requeue: failed transfers start over with a fresh attempt budget."""
    rows = session.execute(
        text(
            "UPDATE transfers SET status = 'pending', reason = NULL, attempts = 0, "
            "next_attempt_at = NULL WHERE status = 'failed' "
            "AND id = ANY(CAST(:ids AS bigint[])) RETURNING id, currency"
        ),
        {"ids": list(transfer_ids)},
    )
    return [(row.id, row.currency) for row in rows]
