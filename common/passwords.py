"""Password hashing (argon2id) and a cache of recent successful verifications.

Basic Auth sends the password with every request. Verifying argon2 each time
would make the hash the cost of the whole API, so a successful check is
remembered under an HMAC of (user id, password, stored hash): the cache never
holds a password, and a password change alters the stored hash and so misses
every old entry. An entry states "this password matches this hash", which never
goes stale, so its lifetime (AUTH_CACHE_TTL, an hour) only bounds memory.

Each hash holds one of the process's hashing slots (HASH_CONCURRENCY): when every slot
is taken, a request needing a hash is refused (`HashingBusy`, answered 503) rather than
queued, so a flood of registrations cannot take the CPUs from signed-in clients
(docs/decisions/0038).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cachetools import TTLCache

from common.settings import Settings, get_settings

# argon2id at OWASP's first recommended setting by default (Settings.argon2_*; why:
# docs/decisions/0006-argon2-cost.md). Tests lower the cost; the algorithm stays the same.
_hasher: PasswordHasher | None = None
# A hash made once per process so an unknown username costs as much as a wrong
# password: response time does not tell which usernames exist.
_dummy_hash: str | None = None
_hasher_lock = threading.Lock()


class HashingBusy(Exception):
    """Every hashing slot of this process is taken: try again in a moment."""


_slots: threading.BoundedSemaphore | None = None


def hashing_slots() -> threading.BoundedSemaphore:
    """The process's hashing slots, made on first use from its settings."""
    global _slots  # noqa: PLW0603 - one per process, built after settings load
    if _slots is None:
        with _hasher_lock:
            if _slots is None:
                _slots = threading.BoundedSemaphore(get_settings().hash_bound)
    return _slots


def hashing_free() -> bool:
    """A slot is free now (it may not be a moment later): lets a flood of requests
    that would find none be refused before any other work."""
    slots = hashing_slots()
    if not slots.acquire(blocking=False):
        return False
    slots.release()
    return True


@contextmanager
def _hashing_slot() -> Iterator[None]:
    slots = hashing_slots()
    # Never waits: a queue of hashes is what makes every thread wait behind them.
    if not slots.acquire(blocking=False):
        raise HashingBusy
    try:
        yield
    finally:
        slots.release()


def make_hasher(settings: Settings) -> PasswordHasher:
    return PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_kib,
        parallelism=1,
    )


def hasher() -> PasswordHasher:
    """The process's hasher, built on first use from the process's settings."""
    global _hasher  # noqa: PLW0603 - one per process, built after settings load
    built = _hasher
    if built is None:
        with _hasher_lock:
            if _hasher is None:
                _hasher = make_hasher(get_settings())
            built = _hasher
    return built


def _dummy() -> str:
    global _dummy_hash  # noqa: PLW0603 - one per process, made on first use
    if _dummy_hash is None:
        _dummy_hash = hasher().hash(os.urandom(16).hex())
    return _dummy_hash


def hash_password(password: str) -> str:
    with _hashing_slot():
        return hasher().hash(password)


def needs_rehash(stored_hash: str) -> bool:
    """The stored hash was made with other parameters than today's."""
    try:
        return hasher().check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def _verify(stored_hash: str, password: str) -> bool:
    try:
        return hasher().verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _verify_slow(stored_hash: str, password: str) -> bool:
    with _hashing_slot():
        return _verify(stored_hash, password)


def burn_verification(password: str) -> None:
    """Spend a verification's time for a user that does not exist."""
    with _hashing_slot():
        _verify(_dummy(), password)


def fingerprint(*parts: str) -> bytes:
    """An HMAC of credentials, to key what is remembered about them: no cache holds a
    password, and the process's key (SECRET_KEY) is needed to tell what an entry is for."""
    # Each part behind its length: no choice of parts can spell another's message.
    message = b"".join(
        len(raw).to_bytes(4, "big") + raw
        for raw in (part.encode("utf-8", "surrogatepass") for part in parts)
    )
    return hmac.digest(get_settings().secret_key, message, hashlib.sha256)


class VerificationCache:
    def __init__(self, ttl_seconds: float, maxsize: int = 100_000) -> None:
        self._entries: TTLCache[bytes, bool] = TTLCache(maxsize=maxsize, ttl=ttl_seconds)
        self._lock = threading.Lock()

    def verify(self, user_id: int, password: str, stored_hash: str) -> bool:
        key = fingerprint(str(user_id), password, stored_hash)
        with self._lock:
            if self._entries.get(key):
                return True
        if not _verify_slow(stored_hash, password):
            return False
        with self._lock:
            self._entries[key] = True
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache: VerificationCache | None = None


def verify_password(user_id: int, password: str, stored_hash: str) -> bool:
    global _cache  # noqa: PLW0603 - one cache per process, built lazily after settings load
    if _cache is None:
        _cache = VerificationCache(get_settings().auth_cache_ttl_s)
    return _cache.verify(user_id, password, stored_hash)
