"""Login throttling: too many failed logins per username or per client address → 429.

Counters live in Redis so every gunicorn worker shares them. If Redis is down
the check fails open: losing throttling for a while beats refusing every login.
"""

from __future__ import annotations

import logging
import os
from functools import cache

import redis

from common.settings import get_settings

log = logging.getLogger(__name__)

WINDOW_S = int(os.environ.get("LOGIN_THROTTLE_WINDOW", "300"))
MAX_FAILURES_PER_USERNAME = int(os.environ.get("LOGIN_FAILURES_PER_USERNAME", "10"))
MAX_FAILURES_PER_ADDRESS = int(os.environ.get("LOGIN_FAILURES_PER_ADDRESS", "100"))
KEY_PREFIX = "remit:login-failures:"


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
    )


def _keys(username: str, address: str) -> tuple[str, str]:
    return (KEY_PREFIX + "user:" + username.lower(), KEY_PREFIX + "addr:" + address)


def retry_after(username: str, address: str) -> int | None:
    """Seconds until another attempt is allowed, or None when not throttled."""
    user_key, address_key = _keys(username, address)
    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.get(user_key).get(address_key).ttl(user_key).ttl(address_key)
        user_count, address_count, user_ttl, address_ttl = pipe.execute()
    except redis.RedisError as error:
        log.warning("login throttle unavailable: %s", error)
        return None
    waits = []
    if user_count is not None and int(user_count) >= MAX_FAILURES_PER_USERNAME:
        waits.append(max(int(user_ttl), 1))
    if address_count is not None and int(address_count) >= MAX_FAILURES_PER_ADDRESS:
        waits.append(max(int(address_ttl), 1))
    return max(waits) if waits else None


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
