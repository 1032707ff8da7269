"""Balance history: an index finding an account's last posting at or before an instant.

GET /accounts/{id}?at= reads the balance_after of the account's last posting with
created_at <= at: one descent of (account_id, created_at, id), O(log n) in the postings
(docs/decisions/0035-balance-history.md). Built CONCURRENTLY, outside a transaction, so
that a deployment onto a big postings table does not stop settlement while it builds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 15:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_postings_account_id_created_at_id",
            "postings",
            ["account_id", "created_at", "id"],
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_postings_account_id_created_at_id",
            table_name="postings",
            postgresql_concurrently=True,
        )
