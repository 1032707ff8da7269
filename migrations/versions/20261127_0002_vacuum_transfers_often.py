"""Vacuum transfers after every 10,000 changed rows, not after a fifth of the table.

Settling a transfer takes it out of the settlement queue, the partial index
ix_transfers_pending (status leaves 'pending'), but its entry stays in the index until
VACUUM removes it: new entries go in at the right-hand end, so nothing else cleans the
old pages. Every claim walks past those entries. With PostgreSQL's default (vacuum once
a fifth of the rows changed) the queue of a 10M-row table may hold 2M dead entries, and
claims slow down tenfold (docs/decisions/0007-autovacuum-transfers.md). Index cleanup stays automatic: PostgreSQL still skips
it when few pages hold dead rows, so a big table is not read in full every 10,000 rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 12:05:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE transfers SET "
        "(autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE transfers RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold)"
    )
