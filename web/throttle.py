"""Login throttling: too many failed logins per username or per client address → 429.

Counters live in Redis so every gunicorn worker shares them. If Redis is down
the check fails open: losing throttling for a while beats refusing every login.

Only failures count, and a success does not reset them: Basic auth logs in on every
request, so a reset on success would let an attacker guess in the gaps between the
real user's requests. The window starts at the first failure and is not extended.
(flask-limiter counts requests per route; failed logins across every route are what
matter here, which these two counters say directly.)
"""

from __future__ import annotations

import hashlib
import logging
import os

import redis

from common.redis_clients import shared_redis

log = logging.getLogger(__name__)

WINDOW_S = int(os.environ.get("LOGIN_THROTTLE_WINDOW", "300"))
MAX_FAILURES_PER_USERNAME = int(os.environ.get("LOGIN_FAILURES_PER_USERNAME", "10"))
MAX_FAILURES_PER_ADDRESS = int(os.environ.get("LOGIN_FAILURES_PER_ADDRESS", "100"))
KEY_PREFIX = "remit:login-failures:"


def _redis() -> redis.Redis:
    return shared_redis("throttle", 0.5)


def _keys(username: str, address: str) -> tuple[str, str]:
    # A digest, not the name: an attacker's 8 KB usernames make 64-character keys, and
    # Redis holds no usernames (nor typos that were passwords).
    digest = hashlib.sha256(username.lower().encode("utf-8", "surrogatepass")).hexdigest()
    return (KEY_PREFIX + "user:" + digest, KEY_PREFIX + "addr:" + address)


def retry_after(username: str, address: str) -> int | None:
    """Seconds until another attempt is allowed, or None when not throttled."""
    keys = _keys(username, address)
    limits = (MAX_FAILURES_PER_USERNAME, MAX_FAILURES_PER_ADDRESS)
    try:
        client = _redis()
        # One round trip on every authenticated request; the TTLs are read only when
        # a counter is over its limit.
        counts = client.mget(keys)
        over = [
            key
            for key, count, limit in zip(keys, counts, limits, strict=True)
            if count is not None and int(count) >= limit
        ]
        if not over:
            return None
        return max(max(int(client.ttl(key)), 1) for key in over)
    except redis.RedisError as error:
        log.warning("login throttle unavailable: %s", error)
        return None


def record_failure(username: str, address: str) -> None:
    try:
        pipe = _redis().pipeline(transaction=False)
        for key in _keys(username, address):
            # The window starts at the first failure and is not extended by later ones.
            pipe.incr(key).expire(key, WINDOW_S, nx=True)
        pipe.execute()
    except redis.RedisError as error:
        log.warning("login throttle unavailable: %s", error)


def ping() -> bool:
    try:
        return bool(_redis().ping())
    except redis.RedisError:
        return False
