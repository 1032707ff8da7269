"""The schema as SQLAlchemy models. Alembic migrations are the only way it is created.

Money columns are BIGINT minor units. Rows of money history (postings) are never
updated; a transfer's own row changes only through its status lifecycle.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SUPERUSER_ID = 1

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AccountKind(enum.StrEnum):
    USER = "user"
    COMMISSION = "commission"
    EXTERNAL = "external"


class TransferStatus(enum.StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    REJECTED = "rejected"
    FAILED = "failed"


# The reason of a `failed` transfer: settlement kept failing past its attempt budget.
SETTLEMENT_ERROR = "settlement_error"


class TransferKind(enum.StrEnum):
    TRANSFER = "transfer"
    DEPOSIT = "deposit"
    REFUND = "refund"
    PAYOUT = "payout"
    CAPTURE = "capture"


class HoldStatus(enum.StrEnum):
    PENDING = "pending"
    HELD = "held"
    REJECTED = "rejected"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


class PostingLeg(enum.StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"
    COMMISSION = "commission"


def _created_at() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )


class Currency(Base):
    __tablename__ = "currencies"

    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    decimals: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    commission_rate: Mapped[Decimal] = mapped_column(Numeric(10, 6), nullable=False)
    # Set by the seed: the superuser's accounts of this currency.
    commission_account_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("accounts.id", use_alter=True)
    )
    external_account_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("accounts.id", use_alter=True)
    )

    __table_args__ = (
        CheckConstraint("code ~ '^[A-Z]{3}$'", name="code_format"),
        CheckConstraint("decimals BETWEEN 0 AND 6", name="decimals_range"),
        CheckConstraint("commission_rate >= 0 AND commission_rate < 1", name="rate_range"),
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    full_name: Mapped[str] = mapped_column(String(200), nullable=False, server_default="")
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        # Usernames are unique ignoring case: "Alice" cannot register beside "alice".
        Index("uq_users_username_lower", func.lower(text("username")), unique=True),
    )


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), ForeignKey("currencies.code"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, server_default="user")
    balance: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Reserved by active holds: `available` is balance - held.
    held: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        CheckConstraint("kind IN ('user', 'commission', 'external')", name="kind_known"),
        # The database refuses an overdraft even if the code had a bug.
        CheckConstraint("balance >= 0 OR kind = 'external'", name="no_overdraft"),
        CheckConstraint("held >= 0", name="held_non_negative"),
        CheckConstraint("held <= balance OR kind = 'external'", name="reserve_within_balance"),
        Index("ix_accounts_user_id_id", "user_id", "id"),
    )


class Transfer(Base):
    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    kind: Mapped[str] = mapped_column(String(16), nullable=False, server_default="transfer")
    from_account_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("accounts.id"), nullable=False
    )
    to_account_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("accounts.id"), nullable=False
    )
    # Denormalised owners: list queries filter by user without joining accounts.
    from_user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    to_user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), ForeignKey("currencies.code"), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    commission: Mapped[int] = mapped_column(BigInteger, nullable=False)
    comment: Mapped[str] = mapped_column(String(255), nullable=False, server_default="")
    reason: Mapped[str | None] = mapped_column(String(64))
    # Who asked for it (the payer, or the superuser for a deposit): scope of idempotency keys.
    requested_by: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # The HTTP request that created it: logs of its settlement carry the same id.
    request_id: Mapped[str | None] = mapped_column(String(64))
    # Failed settlement attempts; the settler leaves the transfer alone until
    # next_attempt_at, and marks it failed past the attempt budget.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A refund's original transfer.
    refund_of: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("transfers.id"))
    # Of an original: its settled refunds, and its refunds not rejected (pending, failed
    # or settled), which a new refund must fit beside (docs/api.md "Refunds").
    refunded: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    refunds_claimed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # A capture's hold.
    hold_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("holds.id", use_alter=True))
    # A payout's: where the money went outside.
    destination: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'settled', 'rejected', 'failed')", name="status_known"
        ),
        CheckConstraint(
            "kind IN ('transfer', 'deposit', 'refund', 'payout', 'capture')", name="kind_known"
        ),
        CheckConstraint("(kind = 'refund') = (refund_of IS NOT NULL)", name="refund_of_iff_refund"),
        CheckConstraint("(kind = 'capture') = (hold_id IS NOT NULL)", name="hold_id_iff_capture"),
        CheckConstraint(
            "(kind = 'payout') = (destination IS NOT NULL)", name="destination_iff_payout"
        ),
        CheckConstraint("kind <> 'refund' OR commission = 0", name="refund_without_commission"),
        CheckConstraint(
            "0 <= refunded AND refunded <= refunds_claimed AND refunds_claimed <= amount",
            name="refunds_within_amount",
        ),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("commission >= 0", name="commission_non_negative"),
        CheckConstraint("from_account_id <> to_account_id", name="distinct_accounts"),
        CheckConstraint(
            "(status = 'settled') = (settled_at IS NOT NULL)", name="settled_at_iff_settled"
        ),
        UniqueConstraint("requested_by", "idempotency_key"),
        Index("ix_transfers_from_user_id_id", "from_user_id", "id"),
        Index("ix_transfers_to_user_id_id", "to_user_id", "id"),
        # The settlement queue: small, since settled rows leave it.
        Index(
            "ix_transfers_pending",
            "currency",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_transfers_failed", "id", postgresql_where=text("status = 'failed'")),
        # Every capture belongs to exactly one hold, and a hold has one live capture.
        Index(
            "uq_transfers_hold_id_live",
            "hold_id",
            unique=True,
            postgresql_where=text("hold_id IS NOT NULL AND status <> 'rejected'"),
        ),
        Index(
            "ix_transfers_refund_of", "refund_of", postgresql_where=text("refund_of IS NOT NULL")
        ),
    )


class Hold(Base):
    """A reservation of amount + commission on `from`, made and released by settlement
    (common.ledger) under the account locks it already takes. `transfer_id` is the
    hold's capture once asked for; `void_requested_at` a void the settler has still to
    apply (docs/api.md "Holds")."""

    __tablename__ = "holds"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    from_account_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("accounts.id"), nullable=False
    )
    to_account_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("accounts.id"), nullable=False
    )
    from_user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    to_user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), ForeignKey("currencies.code"), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    commission: Mapped[int] = mapped_column(BigInteger, nullable=False)
    captured_amount: Mapped[int | None] = mapped_column(BigInteger)
    transfer_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("transfers.id"))
    reason: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(String(255), nullable=False, server_default="")
    requested_by: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    void_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'held', 'rejected', 'captured', 'voided', 'expired')",
            name="status_known",
        ),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("commission >= 0", name="commission_non_negative"),
        CheckConstraint("from_account_id <> to_account_id", name="distinct_accounts"),
        CheckConstraint(
            "(status = 'captured') = (captured_amount IS NOT NULL)",
            name="captured_amount_iff_captured",
        ),
        CheckConstraint(
            "captured_amount IS NULL OR captured_amount BETWEEN 1 AND amount",
            name="captured_within_amount",
        ),
        CheckConstraint(
            "status <> 'captured' OR transfer_id IS NOT NULL", name="captured_by_a_transfer"
        ),
        UniqueConstraint("requested_by", "idempotency_key"),
        Index("ix_holds_from_user_id_id", "from_user_id", "id"),
        Index("ix_holds_to_user_id_id", "to_user_id", "id"),
        # Settlement's work on holds: reservations to make, voids to apply, expiries due.
        Index("ix_holds_pending", "currency", "id", postgresql_where=text("status = 'pending'")),
        Index(
            "ix_holds_void_requested",
            "currency",
            "id",
            postgresql_where=text("status = 'held' AND void_requested_at IS NOT NULL"),
        ),
        Index(
            "ix_holds_expiry",
            "currency",
            "expires_at",
            postgresql_where=text("status = 'held' AND transfer_id IS NULL"),
        ),
    )


class Posting(Base):
    __tablename__ = "postings"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    transfer_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("transfers.id"), nullable=False)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"), nullable=False)
    leg: Mapped[str] = mapped_column(String(16), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        # Exactly-once in the database itself: a transfer's leg can be written only once.
        UniqueConstraint("transfer_id", "leg"),
        CheckConstraint("leg IN ('debit', 'credit', 'commission')", name="leg_known"),
        CheckConstraint("amount <> 0", name="amount_non_zero"),
        Index("ix_postings_account_id_id", "account_id", "id"),
        # Balance history: the last posting at or before an instant (migration 0004).
        Index("ix_postings_account_id_created_at_id", "account_id", "created_at", "id"),
    )


# --- Machine clients (docs/api.md "API keys", "Events", "Webhooks") ---------------------


class ApiKeyScope(enum.StrEnum):
    READ = "read"
    TRANSFERS = "transfers"


class ApiKey(Base):
    """A user's API key. The secret is random, so a SHA-256 digest of it is enough to find
    and check it; the secret itself is never stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    prefix: Mapped[str] = mapped_column(String(12), nullable=False)
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    created_at: Mapped[datetime] = _created_at()
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(
            "cardinality(scopes) > 0 AND scopes <@ ARRAY['read', 'transfers']::text[]",
            name="scopes_known",
        ),
        UniqueConstraint("digest"),
        Index("ix_api_keys_user_id_id", "user_id", "id"),
    )


class EventType(enum.StrEnum):
    TRANSFER_SETTLED = "transfer.settled"
    TRANSFER_REJECTED = "transfer.rejected"
    TRANSFER_FAILED = "transfer.failed"
    TRANSFER_RECEIVED = "transfer.received"
    HOLD_HELD = "hold.held"
    HOLD_REJECTED = "hold.rejected"
    HOLD_CAPTURED = "hold.captured"
    HOLD_VOIDED = "hold.voided"
    HOLD_EXPIRED = "hold.expired"


class Event(Base):
    """An outcome, written in the transaction that made it. `txid` is that transaction's
    id: the feed lists events in (txid, id) order and only those of transactions older
    than every one still running, so a page never skips an event that commits later.
    No foreign keys: settlement writes these in bulk from rows it has just checked."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    txid: Mapped[int] = mapped_column(
        BigInteger, nullable=False, server_default=text("(pg_current_xact_id()::text)::bigint")
    )
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    transfer_id: Mapped[int | None] = mapped_column(BigInteger)
    hold_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.statement_timestamp()
    )

    __table_args__ = (
        CheckConstraint(
            "type IN (" + ", ".join(f"'{event_type.value}'" for event_type in EventType) + ")",
            name="type_known",
        ),
        CheckConstraint("num_nonnulls(transfer_id, hold_id) = 1", name="of_one_object"),
        # The feed's order; `type` included so that a filtered page skips the other
        # types in the index alone, without reading their rows.
        Index("ix_events_user_id_txid_id", "user_id", "txid", "id", postgresql_include=["type"]),
    )


class Webhook(Base):
    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    # Event types, or ["*"] for all of them.
    events: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    # whsec_...: kept as given, since every delivery is signed with it; never logged.
    secret: Mapped[str] = mapped_column(Text, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        CheckConstraint("cardinality(events) > 0", name="events_not_empty"),
        Index("ix_webhooks_user_id_id", "user_id", "id"),
    )


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookDelivery(Base):
    """One event to one webhook, written with the event: what is still to be delivered
    lives in the database, whatever happens to the broker."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False
    )
    event_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.statement_timestamp()
    )
    # Until then a delivery task owns it; a sweep may send it again after.
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The event's created_at + 24 h: no attempt after it.
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="state_known"),
        UniqueConstraint("webhook_id", "event_id"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
    )


class WebhookAttempt(Base):
    """One delivery attempt, for GET /users/{id}/webhooks/{id}/deliveries."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False
    )
    webhook_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False
    )
    event_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = _created_at()
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16), nullable=False)

    __table_args__ = (
        CheckConstraint("state IN ('delivered', 'retrying', 'failed')", name="state_known"),
        Index("ix_webhook_attempts_webhook_id_id", "webhook_id", "id"),
    )
