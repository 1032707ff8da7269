"""The schema as SQLAlchemy models. Alembic migrations are the only way it is created.

Money columns are BIGINT minor units. Rows of money history (postings) are never
updated; a transfer's own row changes only through its status lifecycle.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
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
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        CheckConstraint("kind IN ('user', 'commission', 'external')", name="kind_known"),
        # The database refuses an overdraft even if the code had a bug.
        CheckConstraint("balance >= 0 OR kind = 'external'", name="no_overdraft"),
        Index("ix_accounts_user_id_id", "user_id", "id"),
    )


class Transfer(Base):
    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
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

    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'settled', 'rejected', 'failed')", name="status_known"
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
    )
