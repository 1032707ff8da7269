"""Users: registration (with one account per currency) and credential checks."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

from common.currencies import all_currencies
from common.db import Db, execute_direct
from common.errors import Conflict
from common.models import Account, AccountKind, User
from common.passwords import burn_verification, hash_password, verify_password


def register(session: Session, username: str, password: str, full_name: str) -> User:
    """Create a user and its zero-balance accounts. Fields are validated by the caller."""
    password_hash = hash_password(password)
    # ON CONFLICT on the lower(username) index: two concurrent registrations of
    # "Alice" and "alice" cannot both succeed, and neither surfaces an IntegrityError.
    user_id = session.scalar(
        text(
            "INSERT INTO users (username, password_hash, full_name) "
            "VALUES (:username, :hash, :full_name) "
            "ON CONFLICT ((lower(username))) DO NOTHING RETURNING id"
        ),
        {"username": username, "hash": password_hash, "full_name": full_name},
    )
    if user_id is None:
        raise Conflict("username_taken", f"the username {username!r} is taken")
    session.execute(
        insert(Account),
        [
            {"user_id": user_id, "currency": currency.code, "kind": AccountKind.USER}
            for currency in all_currencies(session)
        ],
    )
    user = session.get(User, user_id)
    assert user is not None
    return user


@dataclass(frozen=True)
class Principal:
    """Who a request is authenticated as."""

    id: int
    username: str


# Core, not ORM: this runs on every authenticated request.
_BY_USERNAME = text(
    "SELECT id, username, password_hash FROM users WHERE lower(username) = lower(:username)"
)


def authenticate(db: Db, username: str, password: str) -> Principal | None:
    """The user these credentials name, or None; costs the same whether or not it exists."""
    # No username holds NUL, and PostgreSQL text cannot even be compared with one.
    lookup = 0 < len(username) <= 64 and "\x00" not in username
    user = None
    if lookup:
        user = execute_direct(db, _BY_USERNAME, {"username": username}).fetchone()
    if user is None:
        burn_verification(password)
        return None
    if not verify_password(user.id, password, user.password_hash):
        return None
    return Principal(user.id, user.username)


def user_exists(session: Session, user_id: int) -> bool:
    return session.scalar(select(func.count()).where(User.id == user_id)) == 1
