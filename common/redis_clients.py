"""One Redis client per purpose and process, shared by its threads.

Built under a lock: two gunicorn threads building a client at once would leave one
uncached, and a garbage-collected redis-py client closes its connection pool, under
any pipeline still using it (ValueError / EBADF out of redis-py: a 500).
"""

from __future__ import annotations

import threading

import redis

from common.settings import get_settings

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


def shared_redis(purpose: str, timeout_s: float) -> redis.Redis:
    """The process's client for `purpose` (throttle, notify, metrics), built once."""
    with _lock:
        client = _clients.get(purpose)
        if client is None:
            client = redis.Redis.from_url(
                get_settings().redis_url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            _clients[purpose] = client
        return client


def forget_clients() -> None:
    """Drop the clients (after fork, or in tests that need a fresh first use)."""
    with _lock:
        _clients.clear()
