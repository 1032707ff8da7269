"""Settlement: the pure rules (plan_batch) and the transaction that applies them.

A batch is every claimable pending transfer of one currency, up to a limit,
applied in id order inside one transaction:

1. take the currency's settlement lock (pg_try_advisory_xact_lock): one settler
   per currency at a time, so batches apply in id order and the hot commission
   account is locked once per batch instead of once per transfer;
2. claim pending transfers, oldest first, then the holds with work due (a reservation to
   make, a void to apply, an expiry), each FOR NO KEY UPDATE SKIP LOCKED;
3. lock every account involved in one statement ordered by id (no deadlock);
4. decide each operation against running balances and holds (plan_batch): releases
   first, then reservations and transfers in the order they were made;
5. write postings, balances, held amounts, statuses, refund totals, and the outcomes'
   events and webhook deliveries (common.events) in one statement of bulk CTEs; commit.

Refunds, payouts and captures are transfers of their own kind; a hold changes only
`held`, never a balance (docs/decisions/0036).

A doorbell for a transfer that is already final finds nothing to claim and
changes nothing; the unique (transfer_id, leg) constraint on postings is the
database's own guard against applying a transfer twice.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from psycopg.rows import args_row, tuple_row
from sqlalchemy import text
from sqlalchemy.orm import Session

from common import events
from common.db import execute_direct
from common.limits import BIGINT_MAX
from common.models import (
    SETTLEMENT_ERROR,
    AccountKind,
    HoldStatus,
    PostingLeg,
    TransferKind,
    TransferStatus,
)

log = logging.getLogger(__name__)

# Namespace of the advisory locks this module takes (the other key is the currency).
SETTLEMENT_LOCK_CLASS = 7301

INSUFFICIENT_FUNDS = "insufficient_funds"
BALANCE_LIMIT = "balance_limit"
# A capture whose hold is no longer held by it: never expected, refused rather than posted.
HOLD_NOT_ACTIVE = "hold_not_active"
_LONG_AGO = datetime.min.replace(tzinfo=UTC)
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
    kind: str = TransferKind.TRANSFER
    refund_of: int | None = None
    hold_id: int | None = None
    # A capture's hold: its reservation, and whether it is still held for this capture.
    hold_reserve: int = 0
    hold_active: bool = False
    created_at: datetime = _LONG_AGO


@dataclass(frozen=True)
class PendingHold:
    """A hold with work due: a reservation to make (`pending`), or a reservation to
    release (`held`, voided or expired)."""

    id: int
    status: str
    from_account_id: int
    # amount + commission: what the hold reserves.
    reserve: int
    void_requested: bool = False
    expired: bool = False
    created_at: datetime = _LONG_AGO


@dataclass
class AccountState:
    id: int
    kind: str
    balance: int
    held: int = 0


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


@dataclass(frozen=True)
class HoldDecision:
    hold_id: int
    status: HoldStatus
    reason: str | None = None
    captured_amount: int | None = None
    # A refused capture gives its hold back: the hold stays held, without a capture.
    release_capture: bool = False


@dataclass
class Plan:
    decisions: list[Decision] = field(default_factory=list)
    postings: list[PlannedPosting] = field(default_factory=list)
    # Final balance of every account whose balance changed.
    balances: dict[int, int] = field(default_factory=dict)
    # Final held amount of every account whose held amount changed.
    held: dict[int, int] = field(default_factory=dict)
    holds: list[HoldDecision] = field(default_factory=list)
    # Original transfer -> (its refunds settled here, its refunds' claims given back here).
    refunds: dict[int, tuple[int, int]] = field(default_factory=dict)

    def refund(self, original_id: int, *, settled: int = 0, released: int = 0) -> None:
        was_settled, was_released = self.refunds.get(original_id, (0, 0))
        self.refunds[original_id] = (was_settled + settled, was_released + released)


def plan_batch(
    transfers: Sequence[PendingTransfer],
    accounts: dict[int, AccountState],
    commission_account_id: int,
    holds: Sequence[PendingHold] = (),
) -> Plan:
    """Decide a batch against running balances and held amounts. Pure: no I/O.

    The payer pays amount + commission, the payee receives amount, the commission
    account receives the commission. A debit needs the payer's available balance
    (balance - held), except on external accounts, which alone may go below zero. A
    capture first releases its hold's whole reservation.

    Order: voids and expiries first (what they free is available to the rest), then
    reservations and transfers in the order they were made; transfers among themselves
    in id order.
    """
    plan = _Planner(accounts, commission_account_id)
    for hold in sorted(holds, key=lambda h: h.id):
        if hold.status == HoldStatus.HELD:
            plan.release(hold)
    reservations: list[PendingHold | PendingTransfer] = sorted(
        (h for h in holds if h.status == HoldStatus.PENDING), key=lambda h: h.id
    )
    ordered: list[PendingHold | PendingTransfer] = sorted(transfers, key=lambda t: t.id)
    for operation in heapq.merge(reservations, ordered, key=lambda op: op.created_at):
        if isinstance(operation, PendingHold):
            plan.reserve(operation)
        else:
            plan.transfer(operation)
    return plan.plan


class _Planner:
    """plan_batch's running state: balances and held amounts as the batch leaves them."""

    def __init__(self, accounts: dict[int, AccountState], commission_account_id: int) -> None:
        self.accounts = accounts
        self.commission_account_id = commission_account_id
        self.balance = {account_id: state.balance for account_id, state in accounts.items()}
        self.held = {account_id: state.held for account_id, state in accounts.items()}
        self.plan = Plan()

    def _available(self, account_id: int) -> int | None:
        """What the account may still spend; None when unbounded (external accounts)."""
        if self.accounts[account_id].kind == AccountKind.EXTERNAL:
            return None
        return self.balance[account_id] - self.held[account_id]

    def _hold(self, account_id: int, held: int) -> None:
        self.held[account_id] = held
        self.plan.held[account_id] = held

    def release(self, hold: PendingHold) -> None:
        """A held hold voided or expired: its reservation is free again."""
        self._hold(hold.from_account_id, self.held[hold.from_account_id] - hold.reserve)
        status = HoldStatus.VOIDED if hold.void_requested else HoldStatus.EXPIRED
        self.plan.holds.append(HoldDecision(hold.id, status))

    def reserve(self, hold: PendingHold) -> None:
        """A pending hold: voided or expired before it was ever held, else reserved if
        the payer can spend it, else rejected."""
        if hold.void_requested:
            self.plan.holds.append(HoldDecision(hold.id, HoldStatus.VOIDED))
            return
        if hold.expired:
            self.plan.holds.append(HoldDecision(hold.id, HoldStatus.EXPIRED))
            return
        available = self._available(hold.from_account_id)
        if available is not None and available < hold.reserve:
            self.plan.holds.append(HoldDecision(hold.id, HoldStatus.REJECTED, INSUFFICIENT_FUNDS))
            return
        self._hold(hold.from_account_id, self.held[hold.from_account_id] + hold.reserve)
        self.plan.holds.append(HoldDecision(hold.id, HoldStatus.HELD))

    def transfer(self, transfer: PendingTransfer) -> None:
        reason = self._post(transfer)
        plan = self.plan
        if reason is None:
            plan.decisions.append(Decision(transfer.id, TransferStatus.SETTLED))
        else:
            plan.decisions.append(Decision(transfer.id, TransferStatus.REJECTED, reason))
        settled = reason is None
        if transfer.refund_of is not None:
            if settled:
                plan.refund(transfer.refund_of, settled=transfer.amount)
            else:
                plan.refund(transfer.refund_of, released=transfer.amount)
        if transfer.hold_id is not None and reason != HOLD_NOT_ACTIVE:
            if settled:
                plan.holds.append(
                    HoldDecision(
                        transfer.hold_id, HoldStatus.CAPTURED, captured_amount=transfer.amount
                    )
                )
            else:
                plan.holds.append(
                    HoldDecision(transfer.hold_id, HoldStatus.HELD, release_capture=True)
                )

    def _post(self, transfer: PendingTransfer) -> str | None:
        """Post the transfer's legs, or return why it is refused (leaving no trace)."""
        payer = transfer.from_account_id
        released = 0
        if transfer.hold_id is not None:
            if not transfer.hold_active:
                return HOLD_NOT_ACTIVE
            # A capture spends its own reservation first: release it, then debit.
            released = transfer.hold_reserve
        debit = transfer.amount + transfer.commission
        available = self._available(payer)
        if available is not None and available + released < debit:
            return INSUFFICIENT_FUNDS
        legs = [
            (PostingLeg.DEBIT, payer, -debit),
            (PostingLeg.CREDIT, transfer.to_account_id, transfer.amount),
        ]
        if transfer.commission:
            legs.append((PostingLeg.COMMISSION, self.commission_account_id, transfer.commission))
        after: dict[int, int] = {}
        postings = []
        for leg, account_id, amount in legs:
            # The payee may be the commission account itself: legs on one account add up.
            after[account_id] = after.get(account_id, self.balance[account_id]) + amount
            postings.append(PlannedPosting(transfer.id, account_id, leg, amount, after[account_id]))
        if any(abs(balance) > MAX_BALANCE for balance in after.values()):
            return BALANCE_LIMIT
        self.balance.update(after)
        self.plan.balances.update(after)
        self.plan.postings.extend(postings)
        if released:
            self._hold(payer, self.held[payer] - released)
        return None


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
    hold_decisions: tuple[HoldDecision, ...] = ()


def _due(table: str = "") -> str:
    """Pending and not backing off after a failed attempt (`table`: a qualifier)."""
    column = f"{table}." if table else ""
    return (
        f"{column}status = 'pending'"
        f" AND ({column}next_attempt_at IS NULL OR {column}next_attempt_at <= now())"
    )


_DUE = _due()


_CLAIM = text(
    "SELECT t.id, t.from_account_id, t.to_account_id, t.amount, t.commission, t.request_id,"
    " extract(epoch FROM clock_timestamp() - t.created_at)::float8,"
    " t.kind, t.refund_of, t.hold_id, coalesce(h.amount + h.commission, 0),"
    # A capture's hold, read without a lock: the web set its transfer_id in the
    # transaction that made the capture, and nothing changes a hold with a live capture.
    " coalesce(h.status = 'held' AND h.transfer_id = t.id, false), t.created_at"
    " FROM transfers t LEFT JOIN holds h ON h.id = t.hold_id"
    f" WHERE t.currency = :currency AND {_due('t')}"
    " ORDER BY t.id LIMIT :limit FOR NO KEY UPDATE OF t SKIP LOCKED"
)


_PENDING_ROWS = args_row(PendingTransfer)


def _claim(session: Session, currency: str, limit: int) -> list[PendingTransfer]:
    params = {"currency": currency, "limit": limit}
    return execute_direct(session, _CLAIM, params, _PENDING_ROWS).fetchall()


# A hold with work due, as the outer query re-checks it on the locked row.
_HOLD_WORK = (
    "(status = 'pending' OR (status = 'held' AND transfer_id IS NULL"
    " AND (void_requested_at IS NOT NULL OR expires_at <= now())))"
)
# The holds with work due, each found through its own partial index; skipped while a
# web request holds the row (asking for a capture or a void): next batch sees it.
_CLAIM_HOLDS = text(
    "SELECT id, status, from_account_id, amount + commission, void_requested_at IS NOT NULL,"
    " expires_at <= now(), created_at FROM holds WHERE id IN ("
    " (SELECT id FROM holds WHERE currency = :currency AND status = 'pending'"
    "  ORDER BY currency, id LIMIT :limit)"
    " UNION ALL (SELECT id FROM holds WHERE currency = :currency AND status = 'held'"
    "  AND void_requested_at IS NOT NULL ORDER BY currency, id LIMIT :limit)"
    " UNION ALL (SELECT id FROM holds WHERE currency = :currency AND status = 'held'"
    "  AND transfer_id IS NULL AND expires_at <= now() ORDER BY currency, expires_at"
    "  LIMIT :limit))"
    f" AND {_HOLD_WORK} ORDER BY id FOR NO KEY UPDATE SKIP LOCKED"
)
_HOLD_ROWS = args_row(PendingHold)


def _claim_holds(session: Session, currency: str, limit: int) -> list[PendingHold]:
    params = {"currency": currency, "limit": limit}
    return execute_direct(session, _CLAIM_HOLDS, params, _HOLD_ROWS).fetchall()


_ACCOUNT_ROWS = args_row(AccountState)
_LOCK_ACCOUNTS = text(
    "SELECT id, kind, balance, held FROM accounts WHERE id = ANY(CAST(:ids AS bigint[])) "
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
    # NULL where the batch changed only the other of the two.
    " UPDATE accounts SET balance = coalesce(v.balance, accounts.balance),"
    " held = coalesce(v.held, accounts.held) FROM unnest(CAST(:account_ids AS bigint[]),"
    " CAST(:account_balances AS bigint[]), CAST(:account_helds AS bigint[]))"
    " AS v(id, balance, held) WHERE accounts.id = v.id"
    "), refunds AS ("
    # The originals of the refunds decided: settled ones add up in `refunded`, rejected
    # ones give their room back.
    " UPDATE transfers SET refunded = refunded + v.settled,"
    " refunds_claimed = refunds_claimed - v.released FROM unnest("
    " CAST(:refund_of AS bigint[]), CAST(:refund_settled AS bigint[]),"
    " CAST(:refund_released AS bigint[])) AS v(id, settled, released)"
    " WHERE transfers.id = v.id"
    "), holds_decided AS ("
    " UPDATE holds SET status = v.status, reason = v.reason, captured_amount = v.captured,"
    " transfer_id = CASE WHEN v.release_capture THEN NULL ELSE holds.transfer_id END,"
    " updated_at = statement_timestamp()"
    " FROM unnest(CAST(:hold_ids AS bigint[]), CAST(:hold_statuses AS text[]),"
    " CAST(:hold_reasons AS text[]), CAST(:hold_captured AS bigint[]),"
    " CAST(:hold_release_capture AS boolean[]))"
    " AS v(id, status, reason, captured, release_capture)"
    " WHERE holds.id = v.id"
    " RETURNING holds.id, holds.status, holds.from_user_id, NOT v.release_capture AS evented"
    "), decided AS ("
    " UPDATE transfers SET status = v.status, reason = v.reason,"
    " settled_at = CASE WHEN v.status = 'settled' THEN statement_timestamp() END,"
    " attempts = attempts + 1, last_error = NULL"
    " FROM unnest(CAST(:transfer_ids AS bigint[]), CAST(:statuses AS text[]),"
    " CAST(:reasons AS text[])) AS v(id, status, reason)"
    " WHERE transfers.id = v.id AND transfers.status = 'pending'"
    " RETURNING transfers.id, transfers.status, transfers.from_user_id, transfers.to_user_id,"
    " transfers.kind"
    # Their events and webhook deliveries, in the same statement (common.events).
    "), " + events.LEDGER_EVENTS + " "
    # The settled_at of every transfer settled here, for the announcement; the
    # deliveries to publish after commit.
    "SELECT statement_timestamp() AS settled_at, " + events.DELIVERY_IDS
)


def _apply(session: Session, plan: Plan) -> tuple[datetime, tuple[int, ...]]:
    """Write the plan; returns the settled_at of the transfers it settled and the ids
    of the webhook deliveries written."""
    changed = list(plan.balances.keys() | plan.held.keys())
    cursor = execute_direct(
        session,
        _APPLY,
        {
            "posting_transfer_ids": [p.transfer_id for p in plan.postings],
            "posting_account_ids": [p.account_id for p in plan.postings],
            "posting_legs": [p.leg.value for p in plan.postings],
            "posting_amounts": [p.amount for p in plan.postings],
            "posting_balances": [p.balance_after for p in plan.postings],
            "account_ids": changed,
            "account_balances": [plan.balances.get(i) for i in changed],
            "account_helds": [plan.held.get(i) for i in changed],
            "refund_of": list(plan.refunds),
            "refund_settled": [settled for settled, _ in plan.refunds.values()],
            "refund_released": [released for _, released in plan.refunds.values()],
            "hold_ids": [h.hold_id for h in plan.holds],
            "hold_statuses": [h.status.value for h in plan.holds],
            "hold_reasons": [h.reason for h in plan.holds],
            "hold_captured": [h.captured_amount for h in plan.holds],
            "hold_release_capture": [h.release_capture for h in plan.holds],
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
    holds = _claim_holds(session, currency, limit)
    if not transfers and not holds:
        return BatchResult(currency, claimed=0)
    account_ids = {commission_account_id}
    for transfer in transfers:
        account_ids.update((transfer.from_account_id, transfer.to_account_id))
    account_ids.update(hold.from_account_id for hold in holds)
    accounts = _lock_accounts(session, account_ids)
    plan = plan_batch(transfers, accounts, commission_account_id, holds)
    settled_at, deliveries = _apply(session, plan)
    settled = tuple(d.transfer_id for d in plan.decisions if d.status == TransferStatus.SETTLED)
    return BatchResult(
        currency,
        claimed=len(transfers) + len(holds),
        settled=len(settled),
        rejected=len(plan.decisions) - len(settled),
        decisions=tuple(plan.decisions),
        settled_at=settled_at,
        request_ids={t.id: t.request_id for t in transfers},
        ages_s={t.id: t.age_s for t in transfers},
        deliveries=deliveries,
        hold_decisions=tuple(plan.holds),
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
    " RETURNING id, attempts, status, from_user_id, to_user_id, kind,"
    " extract(epoch FROM clock_timestamp() - created_at)::float8 AS age_s"
    "), " + events.TRANSFER_EVENTS + " "
    "SELECT id, attempts, status, age_s, " + events.DELIVERY_IDS + " AS deliveries FROM decided"
)


def currencies_due(session: Session, pending_for_s: float) -> dict[str, int]:
    """Currencies with work due that a doorbell should have brought by now: transfers
    and holds pending longer than `pending_for_s`, voids asked for as long ago, and
    holds past their expiry (beat's expiry: the settler expires them)."""
    rows = session.execute(
        text(
            f"SELECT currency, count(*) FROM transfers WHERE {_DUE} "
            "AND created_at < clock_timestamp() - make_interval(secs => :age) "
            "GROUP BY currency "
            "UNION ALL SELECT currency, count(*) FROM holds WHERE ("
            " (status = 'pending' AND created_at < clock_timestamp() - make_interval(secs => :age))"
            " OR (status = 'held' AND void_requested_at"
            "  < clock_timestamp() - make_interval(secs => :age))"
            " OR (status = 'held' AND transfer_id IS NULL AND expires_at <= now()))"
            " GROUP BY currency"
        ),
        {"age": pending_for_s},
    )
    due: dict[str, int] = {}
    for row in rows:
        due[row.currency] = due.get(row.currency, 0) + row[1]
    return dict(sorted(due.items()))


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
