"""Login throttling: too many failed logins per username or per client address → 429.
A wrong, revoked or malformed API key is a failed login too; it names no username, so it
counts per address only.

Counters live in Redis so every gunicorn worker shares them. If Redis is down
the check fails open: losing throttling for a while beats refusing every login.

Only failures count, and a success does not reset them: Basic auth logs in on every
request, so a reset on success would let an attacker guess in the gaps between the
real user's requests. The window starts at the first failure and is not extended.
(flask-limiter counts requests per route; failed logins across every route are what
matter here, which these two counters say directly.)

Reading the counters on every request would cost a Redis round trip per request
(docs/decisions/0005-auth-caches.md). So each process remembers which counters it saw
under their limits, and every failure is published (`FAILURES_CHANNEL`): each process drops
what it remembered of that counter as the message arrives, and reads Redis again on
that counter's next request. Only "under the limit" is remembered, only while the
process's subscriber is connected, and for at most `VIEW_MAX_AGE_S`, which bounds
what a lost message can cost. A throttled answer is always read from Redis.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time

import redis
from cachetools import TLRUCache

from common.live_cache import LiveCache
from common.pubsub import Subscription, subscribe
from common.redis_clients import shared_redis
from web.context import current_settings

log = logging.getLogger(__name__)

# The window and the limits are the app's settings (login_throttle_window_s,
# login_failures_per_username, login_failures_per_address).
KEY_PREFIX = "remit:login-failures:"
FAILURES_CHANNEL = "remit:login-failures"
# How long a counter seen under its limit is believed without a message saying
# otherwise. At 32 active users this is a read per user and process every 2 s instead
# of one per request.
VIEW_MAX_AGE_S = 2.0


def _redis() -> redis.Redis:
    return shared_redis("throttle", 0.5)


def _keys(username: str | None, address: str) -> tuple[str, ...]:
    """The counters a login counts towards: per username and per address; a failed API
    key names no username, so it counts per address only."""
    address_key = KEY_PREFIX + "addr:" + address
    if username is None:
        return (address_key,)
    # A digest, not the name: an attacker's 8 KB usernames make 64-character keys, and
    # Redis holds no usernames (nor typos that were passwords).
    digest = hashlib.sha256(username.lower().encode("utf-8", "surrogatepass")).hexdigest()
    return (KEY_PREFIX + "user:" + digest, address_key)


# Counters seen under their limits (key -> True), dropped by failure messages.
view: LiveCache[str, bool] = LiveCache(VIEW_MAX_AGE_S)


def _on_failures(data: bytes) -> None:
    view.forget(data.decode().split())


subscribe(FAILURES_CHANNEL, Subscription(_on_failures, view.on_link))


def retry_after(username: str | None, address: str) -> int | None:
    """Seconds until another attempt is allowed, or None when not throttled (a bearer
    key: `username` None, the address's counter only)."""
    keys = _keys(username, address)
    if all(view.get(key) for key in keys):
        return None
    generation = view.generation()
    settings = current_settings()
    both = (settings.login_failures_per_username, settings.login_failures_per_address)
    limits = both[-len(keys) :]
    try:
        client = _redis()
        # The TTLs are read only when a counter is over its limit.
        counts = client.mget(keys)
        over = [
            key
            for key, count, limit in zip(keys, counts, limits, strict=True)
            if count is not None and int(count) >= limit
        ]
        if not over:
            for key in keys:
                view.put(key, True, generation)
            return None
        return max(max(int(client.ttl(key)), 1) for key in over)
    except redis.RedisError as error:
        log.warning("login throttle unavailable: %s", error)
        return None


def record_failure(username: str | None, address: str) -> None:
    keys = _keys(username, address)
    window_s = current_settings().login_throttle_window_s
    try:
        pipe = _redis().pipeline(transaction=False)
        for key in keys:
            # The window starts at the first failure and is not extended by later ones.
            pipe.incr(key)
            pipe.expire(key, window_s, nx=True)
        # After the increments, in the same round trip: every process then reads the
        # new counts on these keys' next request.
        pipe.publish(FAILURES_CHANNEL, " ".join(keys))
        pipe.execute()
    except redis.RedisError as error:
        log.warning("login throttle unavailable: %s", error)
    finally:
        # This process's own view is dropped at once, not when its message comes back.
        view.forget(keys)


# Registrations per client address (REGISTRATIONS_PER_ADDRESS per
# REGISTRATION_WINDOW): every attempt counts, read and counted in one round trip; like
# the login counters, the window starts at the first and fails open without Redis.
REGISTRATIONS_PREFIX = "remit:registrations:"


# Addresses this process found over their limit, with when their window ends
# (monotonic): until then they are refused from memory, before Flask
# (web.overload.RegistrationGate), not with a Redis round trip each. Counting those
# attempts would change nothing: the window is not extended.
_over_limit: TLRUCache[str, float] = TLRUCache(
    maxsize=100_000, ttu=lambda _address, until, _now: until
)
_over_limit_lock = threading.Lock()


def registration_retry_after(address: str) -> int | None:
    """Count a registration from `address`; seconds until another is allowed, or None."""
    settings = current_settings()
    key = REGISTRATIONS_PREFIX + address
    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, settings.registration_window_s, nx=True)
        pipe.ttl(key)
        count, _, ttl = pipe.execute()
    except redis.RedisError as error:
        log.warning("registration throttle unavailable: %s", error)
        return None
    if int(count) <= settings.registrations_per_address:
        return None
    wait = max(int(ttl), 1)
    with _over_limit_lock:
        _over_limit[address] = time.monotonic() + wait
    return wait


def registration_refused(address: str) -> int | None:
    """Seconds until `address` may register again, when this process already found it
    over its limit; None when it did not (the route then counts and decides)."""
    with _over_limit_lock:
        until = _over_limit.get(address)
    if until is None:
        return None
    return max(math.ceil(until - time.monotonic()), 1)


def forget_registrations() -> None:
    """Forget which addresses were found over their limit (tests)."""
    with _over_limit_lock:
        _over_limit.clear()


def ping() -> bool:
    try:
        return bool(_redis().ping())
    except redis.RedisError:
        return False
