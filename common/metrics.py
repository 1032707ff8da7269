"""Settlement metrics shared by every worker process, kept in Redis.

Workers are many processes (prefork) on many hosts; Prometheus scrapes the API.
So each batch adds its counts to one Redis hash, and the API's /metrics reads
that hash (web.metrics). Losing the hash (Redis flushed) is a counter reset,
which Prometheus' rate() already handles.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from common.redis_clients import shared_redis

log = logging.getLogger(__name__)

KEY = "remit:metrics:settlement"
# Seconds from acceptance to a final status.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _redis() -> redis.Redis:
    return shared_redis("metrics", 1)


def record_outcomes(outcomes: Iterable[tuple[str, str | None, float]]) -> None:
    """Count (status, reason, seconds since accepted) of transfers just made final."""
    fields: dict[str, int] = {}

    def add(field: str, amount: int = 1) -> None:
        fields[field] = fields.get(field, 0) + amount

    for status, reason, age_s in outcomes:
        add(f"final:{status}:{reason or ''}")
        add("latency_count")
        add("latency_sum_us", int(age_s * 1_000_000))
        for bound in LATENCY_BUCKETS:
            if age_s <= bound:
                add(f"latency_le:{bound}")
    if not fields:
        return
    try:
        pipe = _redis().pipeline(transaction=False)
        for field, amount in fields.items():
            pipe.hincrby(KEY, field, amount)
        pipe.execute()
    except redis.RedisError as error:
        log.warning("settlement metrics not recorded: %s", error)


def read_counters() -> dict[str, int]:
    try:
        raw = _redis().hgetall(KEY)
    except redis.RedisError as error:
        log.warning("settlement metrics unavailable: %s", error)
        return {}
    return {
        key.decode() if isinstance(key, bytes) else key: int(value) for key, value in raw.items()
    }
