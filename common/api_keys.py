"""API keys: random bearer secrets that authenticate their user like the password does.

Only a SHA-256 digest of a secret is stored: the secret is 32 random bytes, so no
dictionary or brute force can invert its digest, and a slow hash (argon2) would only
cost every key-authenticated request its price (docs/decisions/0031-api-keys.md). A
secret is found by its digest through the unique index.

A web process remembers the keys it has just found (`LiveCache`), so a client's next
requests need no query. A revocation publishes `REVOKED_CHANNEL` with the key's digest:
every process drops that key as the message arrives (this one at once), and the cache's
TTL (LOGIN_CACHE_TTL, as for Basic logins) bounds what a lost message can cost; while
the process is not subscribed nothing is believed at all.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from dataclasses import dataclass
from typing import NamedTuple

from psycopg.rows import args_row
from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from common.db import Db, execute_direct
from common.errors import Conflict, NotFound
from common.live_cache import LiveCache
from common.models import ApiKey, ApiKeyScope, User
from common.pubsub import Subscription, publish, subscribe
from common.settings import get_settings
from common.users import Principal

SECRET_PREFIX = "rk_"  # noqa: S105 - the public marker of a secret, not one
# token_urlsafe(32): 43 characters of base64url, 256 random bits.
SECRET_RANDOM_BYTES = 32
# What a well-formed secret looks like: anything else is refused without a query.
_SECRET_SHAPE = re.compile(r"rk_[A-Za-z0-9_-]{32,128}")
PREFIX_LENGTH = 12
NAME_MAX_LENGTH = 100
MAX_KEYS_PER_USER = 20
ALL_SCOPES = (ApiKeyScope.READ.value, ApiKeyScope.TRANSFERS.value)
# last_used_at is written at most this often per key (docs/api.md, "API keys"); the
# interval in _FIND says the same.
LAST_USED_RESOLUTION_S = 60
REVOKED_CHANNEL = "remit:api-keys-revoked"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_RANDOM_BYTES)


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def is_well_formed(secret: str) -> bool:
    return _SECRET_SHAPE.fullmatch(secret) is not None


@dataclass(frozen=True)
class KeyPrincipal:
    """A request authenticated by a key: its user, and what the key may do."""

    user: Principal
    key_id: int
    scopes: frozenset[str]


# --- managing keys (password auth) ------------------------------------------------------


def create_key(
    session: Session, user_id: int, name: str, scopes: tuple[str, ...]
) -> tuple[ApiKey, str]:
    """A new key and its secret (shown once). Fields are validated by the caller."""
    # The user's row, locked: concurrent creates count and insert one after another,
    # so the limit cannot be overrun. NO KEY UPDATE: foreign-key checks (KEY SHARE) of
    # the user's other writes are not blocked.
    session.execute(select(User.id).where(User.id == user_id).with_for_update(key_share=True))
    live = session.scalar(
        select(func.count())
        .select_from(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
    )
    if (live or 0) >= MAX_KEYS_PER_USER:
        raise Conflict("key_limit", f"at most {MAX_KEYS_PER_USER} keys; revoke one first")
    secret = new_secret()
    key_id = session.scalar(
        insert(ApiKey)
        .values(
            user_id=user_id,
            name=name,
            scopes=list(scopes),
            prefix=secret[:PREFIX_LENGTH],
            digest=digest_of(secret),
        )
        .returning(ApiKey.id)
    )
    key = session.get(ApiKey, key_id)
    assert key is not None
    return key, secret


def list_keys(session: Session, user_id: int) -> list[ApiKey]:
    """The user's keys that are not revoked, newest first."""
    return list(
        session.scalars(
            select(ApiKey)
            .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
            .order_by(ApiKey.id.desc())
        )
    )


def get_key(session: Session, user_id: int, key_id: int) -> ApiKey:
    """One of the user's keys that is not revoked."""
    key = session.scalar(
        select(ApiKey).where(
            ApiKey.id == key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None)
        )
    )
    if key is None:
        raise NotFound("key_not_found", f"no key {key_id}")
    return key


def revoke_key(session: Session, user_id: int, key_id: int) -> bytes:
    """Revoke the user's key; its digest, to announce after commit."""
    digest = session.scalar(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.statement_timestamp())
        .returning(ApiKey.digest)
    )
    if digest is None:
        raise NotFound("key_not_found", f"no key {key_id}")
    return bytes(digest)


def announce_revoked(digest: bytes) -> None:
    """After the revocation committed: this process forgets the key at once, the others
    as the message reaches them."""
    _found_keys().forget([digest])
    publish(REVOKED_CHANNEL, digest.hex())


# --- authenticating by key (every key-authenticated request) -----------------------------


class _KeyRow(NamedTuple):
    key_id: int
    user_id: int
    username: str
    scopes: list[str]


# One round trip by the unique digest index; it also stamps last_used_at when that is
# older than LAST_USED_RESOLUTION_S (a write at most once a minute per key, and none
# while a process's cache answers). Written out: a data-modifying CTE.
_FIND = text(
    """
    WITH found AS (
      SELECT k.id, k.user_id, u.username, k.scopes, k.last_used_at
      FROM api_keys k JOIN users u ON u.id = k.user_id
      WHERE k.digest = :digest AND k.revoked_at IS NULL
    ), touched AS (
      UPDATE api_keys SET last_used_at = statement_timestamp()
      WHERE id = (SELECT id FROM found)
        AND (last_used_at IS NULL
             OR last_used_at < statement_timestamp() - interval '60 s')
    )
    SELECT id, user_id, username, scopes FROM found
    """
).bindparams(bindparam("digest", type_=ApiKey.digest.type))
_KEY_ROWS = args_row(_KeyRow)

_found: LiveCache[bytes, KeyPrincipal] | None = None
_found_lock = threading.Lock()


def _found_keys() -> LiveCache[bytes, KeyPrincipal]:
    global _found  # noqa: PLW0603 - one cache per process, built lazily after settings load
    if _found is not None:
        return _found
    with _found_lock:
        if _found is None:
            _found = LiveCache(get_settings().login_cache_ttl_s)
        return _found


def _on_revoked(data: bytes) -> None:
    try:
        digest = bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        # Not ours to understand: forget everything rather than keep a revoked key.
        _found_keys().clear()
        return
    _found_keys().forget([digest])


def _on_link(live: bool) -> None:
    _found_keys().on_link(live)


subscribe(REVOKED_CHANNEL, Subscription(_on_revoked, _on_link))


def recent_key(secret: str) -> KeyPrincipal | None:
    """The key behind `secret` if this process found it a moment ago."""
    return _found_keys().get(digest_of(secret))


def find_key(db: Db, secret: str) -> KeyPrincipal | None:
    """The live key behind `secret`, or None (wrong, revoked or malformed)."""
    if not is_well_formed(secret):
        return None
    digest = digest_of(secret)
    # Taken before the lookup: a revocation announced after it may postdate the read.
    generation = _found_keys().generation()
    row = execute_direct(db, _FIND, {"digest": digest}, _KEY_ROWS).fetchone()
    if row is None:
        return None
    found = KeyPrincipal(Principal(row.user_id, row.username), row.key_id, frozenset(row.scopes))
    _found_keys().put(digest, found, generation)
    return found


def forget_keys() -> None:
    """This process only (tests)."""
    _found_keys().clear()
