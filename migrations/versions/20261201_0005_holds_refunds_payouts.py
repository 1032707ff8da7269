"""Money back, out and held: transfer kinds, refunds, payouts, holds and held balances.

- transfers gain `kind`, `refund_of`, `refunded` (settled refunds), `refunds_claimed`
  (refunds not rejected: what a new refund must fit beside), `hold_id` (a capture's
  hold) and `destination` (a payout's); CHECKs tie each field to its kind and keep
  refunded <= refunds_claimed <= amount.
- accounts gain `held`: 0 <= held <= balance on every account that is not external.
- holds: a reservation made and released by settlement; `transfer_id` is its capture,
  `void_requested_at` a void the settler has still to apply.
- events may be of a hold instead of a transfer.

Existing transfers from an external account are deposits. The partial indexes on
transfers are built CONCURRENTLY, outside the transaction, as 0004's was.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts", sa.Column("held", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.create_check_constraint(op.f("ck_accounts_held_non_negative"), "accounts", "held >= 0")
    op.create_check_constraint(
        op.f("ck_accounts_reserve_within_balance"),
        "accounts",
        "held <= balance OR kind = 'external'",
    )

    op.create_table(
        "holds",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("from_account_id", sa.BigInteger(), nullable=False),
        sa.Column("to_account_id", sa.BigInteger(), nullable=False),
        sa.Column("from_user_id", sa.BigInteger(), nullable=False),
        sa.Column("to_user_id", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("commission", sa.BigInteger(), nullable=False),
        sa.Column("captured_amount", sa.BigInteger(), nullable=True),
        sa.Column("transfer_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("comment", sa.String(length=255), server_default="", nullable=False),
        sa.Column("requested_by", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("void_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'held', 'rejected', 'captured', 'voided', 'expired')",
            name=op.f("ck_holds_status_known"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_holds_amount_positive")),
        sa.CheckConstraint("commission >= 0", name=op.f("ck_holds_commission_non_negative")),
        sa.CheckConstraint(
            "from_account_id <> to_account_id", name=op.f("ck_holds_distinct_accounts")
        ),
        sa.CheckConstraint(
            "(status = 'captured') = (captured_amount IS NOT NULL)",
            name=op.f("ck_holds_captured_amount_iff_captured"),
        ),
        sa.CheckConstraint(
            "captured_amount IS NULL OR captured_amount BETWEEN 1 AND amount",
            name=op.f("ck_holds_captured_within_amount"),
        ),
        sa.CheckConstraint(
            "status <> 'captured' OR transfer_id IS NOT NULL",
            name=op.f("ck_holds_captured_by_a_transfer"),
        ),
        sa.ForeignKeyConstraint(
            ["from_account_id"], ["accounts.id"], name=op.f("fk_holds_from_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["to_account_id"], ["accounts.id"], name=op.f("fk_holds_to_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["from_user_id"], ["users.id"], name=op.f("fk_holds_from_user_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["to_user_id"], ["users.id"], name=op.f("fk_holds_to_user_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["requested_by"], ["users.id"], name=op.f("fk_holds_requested_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_holds_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_holds")),
        sa.UniqueConstraint(
            "requested_by", "idempotency_key", name=op.f("uq_holds_requested_by_idempotency_key")
        ),
    )
    op.create_index("ix_holds_from_user_id_id", "holds", ["from_user_id", "id"])
    op.create_index("ix_holds_to_user_id_id", "holds", ["to_user_id", "id"])
    # Settlement's work on holds: reservations to make, voids to apply, expiries due.
    op.create_index(
        "ix_holds_pending",
        "holds",
        ["currency", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_holds_void_requested",
        "holds",
        ["currency", "id"],
        postgresql_where=sa.text("status = 'held' AND void_requested_at IS NOT NULL"),
    )
    op.create_index(
        "ix_holds_expiry",
        "holds",
        ["currency", "expires_at"],
        postgresql_where=sa.text("status = 'held' AND transfer_id IS NULL"),
    )

    op.add_column(
        "transfers",
        sa.Column("kind", sa.String(length=16), server_default="transfer", nullable=False),
    )
    op.add_column("transfers", sa.Column("refund_of", sa.BigInteger(), nullable=True))
    op.add_column(
        "transfers", sa.Column("refunded", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column(
        "transfers",
        sa.Column("refunds_claimed", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column("transfers", sa.Column("hold_id", sa.BigInteger(), nullable=True))
    op.add_column("transfers", sa.Column("destination", sa.String(length=200), nullable=True))
    op.execute(
        "UPDATE transfers SET kind = 'deposit' WHERE from_account_id IN "
        "(SELECT external_account_id FROM currencies WHERE external_account_id IS NOT NULL)"
    )
    op.create_check_constraint(
        op.f("ck_transfers_kind_known"),
        "transfers",
        "kind IN ('transfer', 'deposit', 'refund', 'payout', 'capture')",
    )
    op.create_check_constraint(
        op.f("ck_transfers_refund_of_iff_refund"),
        "transfers",
        "(kind = 'refund') = (refund_of IS NOT NULL)",
    )
    op.create_check_constraint(
        op.f("ck_transfers_hold_id_iff_capture"),
        "transfers",
        "(kind = 'capture') = (hold_id IS NOT NULL)",
    )
    op.create_check_constraint(
        op.f("ck_transfers_destination_iff_payout"),
        "transfers",
        "(kind = 'payout') = (destination IS NOT NULL)",
    )
    op.create_check_constraint(
        op.f("ck_transfers_refund_without_commission"),
        "transfers",
        "kind <> 'refund' OR commission = 0",
    )
    op.create_check_constraint(
        op.f("ck_transfers_refunds_within_amount"),
        "transfers",
        "0 <= refunded AND refunded <= refunds_claimed AND refunds_claimed <= amount",
    )
    op.create_foreign_key(
        op.f("fk_transfers_refund_of_transfers"), "transfers", "transfers", ["refund_of"], ["id"]
    )
    op.create_foreign_key(
        op.f("fk_transfers_hold_id_holds"), "transfers", "holds", ["hold_id"], ["id"]
    )
    op.create_foreign_key(
        op.f("fk_holds_transfer_id_transfers"), "holds", "transfers", ["transfer_id"], ["id"]
    )

    op.add_column("events", sa.Column("hold_id", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        op.f("ck_events_of_one_object"), "events", "num_nonnulls(transfer_id, hold_id) = 1"
    )

    with op.get_context().autocommit_block():
        # Every capture belongs to exactly one hold, and a hold has one live capture.
        op.create_index(
            "uq_transfers_hold_id_live",
            "transfers",
            ["hold_id"],
            unique=True,
            postgresql_where=sa.text("hold_id IS NOT NULL AND status <> 'rejected'"),
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_transfers_refund_of",
            "transfers",
            ["refund_of"],
            postgresql_where=sa.text("refund_of IS NOT NULL"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_transfers_refund_of", table_name="transfers", postgresql_concurrently=True
        )
        op.drop_index(
            "uq_transfers_hold_id_live", table_name="transfers", postgresql_concurrently=True
        )
    op.drop_constraint(op.f("ck_events_of_one_object"), "events", type_="check")
    op.drop_column("events", "hold_id")
    op.drop_constraint(op.f("fk_holds_transfer_id_transfers"), "holds", type_="foreignkey")
    op.drop_constraint(op.f("fk_transfers_hold_id_holds"), "transfers", type_="foreignkey")
    op.drop_constraint(op.f("fk_transfers_refund_of_transfers"), "transfers", type_="foreignkey")
    for name in (
        "refunds_within_amount",
        "refund_without_commission",
        "destination_iff_payout",
        "hold_id_iff_capture",
        "refund_of_iff_refund",
        "kind_known",
    ):
        op.drop_constraint(op.f(f"ck_transfers_{name}"), "transfers", type_="check")
    for column in ("destination", "hold_id", "refunds_claimed", "refunded", "refund_of", "kind"):
        op.drop_column("transfers", column)
    op.drop_table("holds")
    op.drop_constraint(op.f("ck_accounts_reserve_within_balance"), "accounts", type_="check")
    op.drop_constraint(op.f("ck_accounts_held_non_negative"), "accounts", type_="check")
    op.drop_column("accounts", "held")
