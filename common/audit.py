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
)


def audit(session: Session) -> list[str]:
    """Every violation found, as readable lines; empty when the ledger is sound."""
    violations = []
    for check in CHECKS:
        for row in session.execute(text(check.sql)).all():
            violations.append(f"{check.name}: {tuple(row)}")
    return violations
