"""Accounts and their statements."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Select, func, select, text
from sqlalchemy.orm import Session

from common.currencies import get_currency
from common.errors import Conflict, Invalid, NotFound
from common.models import SUPERUSER_ID, Account, AccountKind, Posting, User

MAX_ACCOUNTS_PER_USER = 50


def list_accounts(session: Session, user_id: int) -> Sequence[Account]:
    return session.scalars(
        select(Account).where(Account.user_id == user_id).order_by(Account.id)
    ).all()


def get_visible_account(session: Session, account_id: int, viewer_id: int) -> Account:
    """The account if the viewer owns it or is the superuser; otherwise not found."""
    account = session.get(Account, account_id)
    if account is None or viewer_id not in (account.user_id, SUPERUSER_ID):
        raise NotFound("account_not_found", f"no account {account_id} visible to this user")
    return account


def open_account(session: Session, user_id: int, currency_code: str) -> Account:
    get_currency(session, currency_code)
    # Lock the owner so two concurrent opens cannot both pass the limit check.
    session.execute(select(User.id).where(User.id == user_id).with_for_update())
    held = session.scalar(select(func.count()).where(Account.user_id == user_id))
    if held is not None and held >= MAX_ACCOUNTS_PER_USER:
        raise Conflict("account_limit", f"a user holds at most {MAX_ACCOUNTS_PER_USER} accounts")
    account = Account(user_id=user_id, currency=currency_code, kind=AccountKind.USER)
    session.add(account)
    session.flush()
    session.refresh(account)
    return account


def list_postings(
    session: Session, account_id: int, *, descending: bool, after_id: int | None, limit: int
) -> Sequence[Posting]:
    query = postings_page(account_id, descending=descending, after_id=after_id, limit=limit)
    return session.scalars(query).all()


def postings_page(
    account_id: int, *, descending: bool, after_id: int | None, limit: int
) -> Select[Posting]:
    """One page of a statement: a range scan of the (account_id, id) index."""
    query = select(Posting).where(Posting.account_id == account_id)
    if after_id is not None:
        query = query.where(Posting.id < after_id if descending else Posting.id > after_id)
    order = Posting.id.desc() if descending else Posting.id.asc()
    return query.order_by(order).limit(limit)


# The last posting at or before the instant: one descent of the index on (account_id,
# created_at, id). Settlement stamps a batch's postings with its statement_timestamp() and
# batches of a currency run one at a time under its lock, so within an account created_at
# never decreases as ids grow: the last by (created_at, id) holds the balance then. The
# instant is compared with the database's clock, the one that stamped the postings.
_BALANCE_AT = text(
    "SELECT CAST(:at AS timestamptz) > statement_timestamp(),"
    " (SELECT balance_after FROM postings WHERE account_id = :account_id"
    " AND created_at <= CAST(:at AS timestamptz) ORDER BY created_at DESC, id DESC LIMIT 1)"
)


def balance_at(session: Session, account_id: int, at: datetime) -> int:
    """The account's balance at the instant `at`: 0 before its first posting.

    An instant later than the database's clock is refused (invalid_query).
    """
    row = session.execute(_BALANCE_AT, {"account_id": account_id, "at": at}).one()
    if row[0]:
        raise Invalid("invalid_query", "at: must not be in the future")
    return int(row[1] or 0)
