"""The ledger audit: every invariant of DESIGN.md checked against a live database.

`python -m common.audit` (the CLI's `audit` command) prints one line per violation
and exits 1 if there is any.
Each check is one SQL query returning the offending rows, so the report names them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Check:
    name: str
    sql: str


CHECKS = (
    Check(
        "per-currency sum of balances is not zero",
        "SELECT currency, sum(balance) FROM accounts GROUP BY currency HAVING sum(balance) <> 0",
    ),
    Check(
        "account balance differs from the sum of its postings",
        """
        SELECT a.id, a.balance, coalesce(sum(p.amount), 0) AS postings
        FROM accounts a LEFT JOIN postings p ON p.account_id = a.id
        GROUP BY a.id HAVING a.balance <> coalesce(sum(p.amount), 0)
        """,
    ),
    Check(
        "negative balance on an account that is not external",
        "SELECT id, kind, balance FROM accounts WHERE balance < 0 AND kind <> 'external'",
    ),
    Check(
        "settled transfer whose postings do not sum to zero",
        """
        SELECT t.id, coalesce(sum(p.amount), 0) FROM transfers t
        LEFT JOIN postings p ON p.transfer_id = t.id
        WHERE t.status = 'settled' GROUP BY t.id HAVING coalesce(sum(p.amount), 0) <> 0
        """,
    ),
    Check(
        "settled transfer without exactly its legs (debit, credit, commission if any)",
        """
        SELECT t.id FROM transfers t JOIN currencies c ON c.code = t.currency
        WHERE t.status = 'settled' AND (
          (SELECT count(*) FROM postings p WHERE p.transfer_id = t.id)
            <> CASE WHEN t.commission > 0 THEN 3 ELSE 2 END
          OR NOT EXISTS (SELECT 1 FROM postings p WHERE p.transfer_id = t.id AND p.leg = 'debit'
                         AND p.account_id = t.from_account_id
                         AND p.amount = -(t.amount + t.commission))
          OR NOT EXISTS (SELECT 1 FROM postings p WHERE p.transfer_id = t.id AND p.leg = 'credit'
                         AND p.account_id = t.to_account_id AND p.amount = t.amount)
          OR (t.commission > 0 AND NOT EXISTS (
                SELECT 1 FROM postings p WHERE p.transfer_id = t.id AND p.leg = 'commission'
                AND p.account_id = c.commission_account_id AND p.amount = t.commission)))
        """,
    ),
    Check(
        "transfer that is not settled but has postings",
        """
        SELECT t.id, t.status FROM transfers t
        WHERE t.status <> 'settled' AND EXISTS (SELECT 1 FROM postings p WHERE p.transfer_id = t.id)
        """,
    ),
    Check(
        "posting whose balance_after breaks its account's running balance",
        """
        SELECT id, account_id, balance_after, running FROM (
          SELECT id, account_id, balance_after,
                 sum(amount) OVER (PARTITION BY account_id ORDER BY id) AS running
          FROM postings) s
        WHERE balance_after <> running
        """,
    ),
    Check(
        "held amount outside 0..balance on an account that is not external",
        "SELECT id, kind, balance, held FROM accounts "
        "WHERE held < 0 OR (held > balance AND kind <> 'external')",
    ),
    Check(
        "held amount differs from the sum of the account's active reservations",
        """
        SELECT a.id, a.held, coalesce(h.reserved, 0) FROM accounts a
        LEFT JOIN (SELECT from_account_id, sum(amount + commission) AS reserved FROM holds
                   WHERE status = 'held' GROUP BY from_account_id) h
          ON h.from_account_id = a.id
        WHERE a.held <> coalesce(h.reserved, 0)
        """,
    ),
    Check(
        "refund totals of a transfer differ from its refunds, or exceed its amount",
        """
        SELECT o.id, o.amount, o.refunded, o.refunds_claimed,
               coalesce(r.settled, 0), coalesce(r.claimed, 0)
        FROM transfers o
        LEFT JOIN (SELECT refund_of,
                          sum(amount) FILTER (WHERE status = 'settled') AS settled,
                          sum(amount) FILTER (WHERE status <> 'rejected') AS claimed
                   FROM transfers WHERE refund_of IS NOT NULL GROUP BY refund_of) r
          ON r.refund_of = o.id
        WHERE (r.refund_of IS NOT NULL OR o.refunds_claimed <> 0 OR o.refunded <> 0)
          AND (o.refunded <> coalesce(r.settled, 0) OR o.refunds_claimed <> coalesce(r.claimed, 0)
               OR coalesce(r.claimed, 0) > o.amount)
        """,
    ),
    Check(
        "refund that does not reverse a settled transfer or capture",
        """
        SELECT r.id, r.refund_of FROM transfers r JOIN transfers o ON o.id = r.refund_of
        WHERE o.status <> 'settled' OR o.kind NOT IN ('transfer', 'capture')
           OR r.from_account_id <> o.to_account_id OR r.to_account_id <> o.from_account_id
           OR r.commission <> 0
        """,
    ),
    Check(
        "capture that does not belong to its hold",
        """
        SELECT t.id, t.hold_id, h.status FROM transfers t LEFT JOIN holds h ON h.id = t.hold_id
        WHERE t.kind = 'capture' AND (
          h.id IS NULL OR t.from_account_id <> h.from_account_id
          OR t.to_account_id <> h.to_account_id OR t.amount > h.amount
          OR (t.status = 'settled' AND (h.status <> 'captured' OR h.transfer_id <> t.id
                                        OR h.captured_amount <> t.amount)))
        """,
    ),
    Check(
        "captured hold without exactly one settled capture",
        """
        SELECT h.id, h.transfer_id,
               (SELECT count(*) FROM transfers t
                WHERE t.hold_id = h.id AND t.status = 'settled') AS settled_captures
        FROM holds h
        WHERE (SELECT count(*) FROM transfers t WHERE t.hold_id = h.id AND t.status = 'settled')
              <> CASE WHEN h.status = 'captured' THEN 1 ELSE 0 END
        """,
    ),
    Check(
        "payout that does not go to its currency's external account",
        """
        SELECT t.id FROM transfers t JOIN currencies c ON c.code = t.currency
        WHERE t.kind = 'payout' AND t.to_account_id <> c.external_account_id
        """,
    ),
)


def audit(session: Session) -> list[str]:
    """Every violation found, as readable lines; empty when the ledger is sound."""
    violations = []
    for check in CHECKS:
        for row in session.execute(text(check.sql)).all():
            violations.append(f"{check.name}: {tuple(row)}")
    return violations
