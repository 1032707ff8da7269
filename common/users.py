"""Users: registration (with one account per currency) and credential checks."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple

from psycopg.rows import args_row
from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from common.currencies import all_currencies
from common.db import Db, execute_direct
from common.errors import Conflict
from common.limits import USERNAME_MAX_LENGTH
from common.live_cache import LiveCache
from common.models import Account, AccountKind, User
from common.passwords import burn_verification, fingerprint, hash_password, verify_password
from common.pubsub import Subscription, publish, subscribe
from common.settings import get_settings


def register(session: Session, username: str, password: str, full_name: str) -> User:
    """Create a user and its zero-balance accounts. Fields are validated by the caller."""
    password_hash = hash_password(password)
    # ON CONFLICT on the lower(username) index: two concurrent registrations of
    # "Alice" and "alice" cannot both succeed, and neither surfaces an IntegrityError.
    user_id = session.scalar(
        pg_insert(User)
        .values(username=username, password_hash=password_hash, full_name=full_name)
        .on_conflict_do_nothing(index_elements=[func.lower(User.username)])
        .returning(User.id)
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


class _Credentials(NamedTuple):
    id: int
    username: str
    password_hash: str


# Core, not ORM: this runs on every authenticated request.
_BY_USERNAME = select(User.id, User.username, User.password_hash).where(
    func.lower(User.username) == func.lower(bindparam("username", type_=User.username.type))
)
_CREDENTIALS_ROWS = args_row(_Credentials)


# Credentials that logged in a moment ago, so that a client's next requests need no
# query to find its user (bench/README.md, "Where one POST's time goes"). Keyed by the
# username and password as sent: a wrong password never finds an entry, so a failed
# login costs the same with or without one. A password change publishes
# CREDENTIALS_CHANNEL, which empties every process's cache; LOGIN_CACHE_TTL bounds
# what a lost message (or a hash changed by hand in SQL) can cost.
CREDENTIALS_CHANNEL = "remit:credentials-changed"
_recent: LiveCache[bytes, Principal] | None = None
_recent_lock = threading.Lock()


def _recent_logins() -> LiveCache[bytes, Principal]:
    global _recent  # noqa: PLW0603 - one cache per process, built lazily after settings load
    if _recent is not None:  # every authenticated request: no lock once built
        return _recent
    with _recent_lock:
        if _recent is None:
            _recent = LiveCache(get_settings().login_cache_ttl_s)
        return _recent


def _on_link(live: bool) -> None:
    _recent_logins().on_link(live)


def _on_credentials_changed(data: bytes) -> None:
    _recent_logins().clear()


subscribe(CREDENTIALS_CHANNEL, Subscription(_on_credentials_changed, _on_link))


def recent_login(username: str, password: str) -> Principal | None:
    """The user these credentials logged in as a moment ago, if they did."""
    return _recent_logins().get(fingerprint(username, password))


def forget_logins() -> None:
    """This process only (tests)."""
    _recent_logins().clear()


def announce_credentials_changed() -> None:
    """After a committed password change: no process may keep accepting the old one.
    This one forgets at once; the others as the message reaches them."""
    forget_logins()
    publish(CREDENTIALS_CHANNEL, "")


def authenticate(db: Db, username: str, password: str) -> Principal | None:
    """The user these credentials name, or None; costs the same whether or not it exists."""
    # No username holds NUL, and PostgreSQL text cannot even be compared with one.
    lookup = 0 < len(username) <= USERNAME_MAX_LENGTH and "\x00" not in username
    # Taken before the lookup: a change announced after it may postdate what we read.
    generation = _recent_logins().generation()
    user = None
    if lookup:
        params = {"username": username}
        user = execute_direct(db, _BY_USERNAME, params, _CREDENTIALS_ROWS).fetchone()
    if user is None:
        burn_verification(password)
        return None
    if not verify_password(user.id, password, user.password_hash):
        return None
    principal = Principal(user.id, user.username)
    _recent_logins().put(fingerprint(username, password), principal, generation)
    return principal


def user_exists(session: Session, user_id: int) -> bool:
    return session.scalar(select(func.count()).where(User.id == user_id)) == 1
