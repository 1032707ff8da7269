"""Redis pub/sub for the web processes: settlement announcements and other news.

Each web process keeps one subscriber thread on one connection. Modules register
the channels they need at import time (`subscribe`), before the thread starts; it
hands every message to its channel's handler, and tells every channel when
messages may have been missed (the connection was lost, or is back), so that
whatever a handler keeps can be dropped.

Settlement announcements: once a batch committed, the worker publishes how each of
its transfers ended (status, reason, settled_at), signed, and the listener wakes the
requests waiting on them (long polling, `?wait=`), which answer from the message.
An announcement naming only ids (a transfer marked failed), or one whose signature
does not verify, makes them read the transfer again. A lost announcement only makes a
waiter sleep until its timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import redis
from cachetools import TTLCache

from common.redis_clients import shared_redis
from common.settings import get_settings

log = logging.getLogger(__name__)

CHANNEL = "remit:transfers:final"


def _publisher() -> redis.Redis:
    return shared_redis("notify", 1)


def publish(channel: str, message: str) -> None:
    """Best effort: whoever subscribes copes with a lost message."""
    try:
        _publisher().publish(channel, message)
    except redis.RedisError as error:
        log.warning("message on %s lost: %s", channel, error)


@dataclass(frozen=True)
class Final:
    """A transfer's final state as its settlement committed it."""

    status: str
    reason: str | None
    settled_at: datetime | None


def announce_final(transfer_ids: Iterable[int]) -> None:
    """Tell waiting requests these transfers are final (after commit): they read them
    again. If the message is lost, they wake at their timeout."""
    ids = ",".join(str(i) for i in transfer_ids)
    if ids:
        publish(CHANNEL, ids)


def _signature(payload: str) -> str:
    return hmac.new(get_settings().secret_key, payload.encode(), hashlib.sha256).hexdigest()


_SIGNATURE_LENGTH = 64


def announce_decided(decided: Iterable[tuple[int, str, str | None]], settled_at: datetime) -> None:
    """Tell waiting requests how these transfers ended (after commit): (id, status,
    reason), settled ones at `settled_at`. The waiters answer from the message, without
    reading the transfer again (bench/README.md, phase d).

    Signed with SECRET_KEY: a client is told "settled" only on the word of a process
    that holds the key, never on a message anyone with access to Redis could publish.
    An announcement that does not verify (a forgery, or processes without a shared
    SECRET_KEY, as in development) only wakes the waiters, who read the transfer."""
    final = [[transfer_id, status, reason] for transfer_id, status, reason in decided]
    if final:
        payload = json.dumps({"settled_at": settled_at.isoformat(), "final": final})
        publish(CHANNEL, _signature(payload) + payload)


def _parse_announcement(data: bytes) -> dict[int, Final | None]:
    """Transfer id -> its final state, or None where the message only names the id (or
    its signature does not verify)."""
    text = _text(data)
    if text[_SIGNATURE_LENGTH : _SIGNATURE_LENGTH + 1] != "{":
        return {int(part): None for part in text.split(",") if part.isdigit()}
    signature, payload = text[:_SIGNATURE_LENGTH], text[_SIGNATURE_LENGTH:]
    try:
        message = json.loads(payload)
        entries = [
            (int(transfer_id), status, reason) for transfer_id, status, reason in message["final"]
        ]
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable settlement announcement ignored")
        return {}
    if not hmac.compare_digest(signature, _signature(payload)):
        return {transfer_id: None for transfer_id, _, _ in entries}
    settled_at = datetime.fromisoformat(message["settled_at"])
    return {
        transfer_id: Final(status, reason, settled_at if status == "settled" else None)
        for transfer_id, status, reason in entries
    }


def _ignore_link(live: bool) -> None:
    return None


@dataclass(frozen=True)
class Subscription:
    on_message: Callable[[bytes], None]
    # Called with False when the connection is lost and with True once subscribed
    # again: between the two, messages were missed.
    on_link: Callable[[bool], None] = _ignore_link


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Subscriber:
    """One pub/sub connection and the thread reading it, for a fixed set of channels."""

    def __init__(self, redis_url: str, channels: dict[str, Subscription]) -> None:
        self._redis_url = redis_url
        self._channels = dict(channels)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._pubsub: redis.client.PubSub | None = None
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        """End the thread (tests: a process's own subscriber lives as long as it)."""
        self._stopping.set()
        pubsub = self._pubsub
        if pubsub is not None:
            pubsub.close()

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                # A thread does not survive fork: whatever the parent saw is not ours.
                self._subscribed.clear()
                self._thread = threading.Thread(target=self._run, name="pubsub", daemon=True)
                self._thread.start()

    def live(self) -> bool:
        """Subscribed to every channel now, so no message is being missed."""
        thread = self._thread
        return self._subscribed.is_set() and thread is not None and thread.is_alive()

    def wait_subscribed(self, timeout_s: float) -> bool:
        self.ensure_running()
        return self._subscribed.wait(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except Exception as error:
                if self._stopping.is_set():
                    break
                if isinstance(error, redis.RedisError):
                    log.warning("pub/sub listener reconnecting after: %s", error)
                else:
                    log.exception("pub/sub listener failed; reconnecting")
            finally:
                # Whatever happened, the caches must hear that messages may be missed.
                self._set_live(False)
            self._stopping.wait(1)

    def _listen(self) -> None:
        client = redis.Redis.from_url(self._redis_url, socket_connect_timeout=2)
        pubsub = self._pubsub = client.pubsub()
        try:
            pubsub.subscribe(*self._channels)
            unconfirmed = set(self._channels)
            for message in pubsub.listen():
                channel = _text(message["channel"])
                kind = _text(message["type"])
                if kind == "subscribe":
                    # Live only once the server confirmed every channel: a message
                    # published before that would be missed.
                    unconfirmed.discard(channel)
                    if not unconfirmed:
                        self._set_live(True)
                elif kind == "message" and channel in self._channels:
                    self._handle(self._channels[channel].on_message, message["data"])
        finally:
            pubsub.close()
            client.close()

    def _set_live(self, live: bool) -> None:
        if not live:
            self._subscribed.clear()
        for subscription in self._channels.values():
            self._handle(subscription.on_link, live)
        if live:
            self._subscribed.set()

    @staticmethod
    def _handle(handler: Callable[[object], None], argument: object) -> None:
        try:
            handler(argument)
        except Exception:
            # One bad message must not stop the process from hearing the next ones.
            log.exception("pub/sub handler failed")


_channels: dict[str, Subscription] = {}
_subscriber_lock = threading.Lock()
_subscriber: Subscriber | None = None


def subscribe(channel: str, subscription: Subscription) -> None:
    """Have the process's subscriber follow `channel`; call at import time."""
    with _subscriber_lock:
        if _subscriber is not None:
            raise RuntimeError(f"subscribe to {channel!r} before the subscriber starts")
        _channels[channel] = subscription


def subscriber() -> Subscriber:
    """The process's one subscriber, started (built under a lock: threads race at first
    use; restarted in a forked child, whose parent's thread did not follow it)."""
    global _subscriber  # noqa: PLW0603 - one per process, built lazily after settings load
    with _subscriber_lock:
        if _subscriber is None:
            _subscriber = Subscriber(get_settings().redis_url, _channels)
        built = _subscriber
    built.ensure_running()
    return built


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LiveCache(Generic[K, V]):
    """A process-local cache kept true by pub/sub: the owner's messages drop the
    entries they name (`forget`), and everything is dropped whenever messages may have
    been missed — the subscriber lost its connection or is not subscribed yet, or the
    process was just forked. Entries live at most `ttl_s`, which bounds what a message
    lost while connected can cost.

    `generation` changes on every drop. A reader takes it before reading the source
    and `put`s what it read under it: if anything was dropped meanwhile, the value may
    predate the change the message announced, and is not kept.
    """

    def __init__(self, ttl_s: float, maxsize: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._entries: TTLCache[K, V] = TTLCache(maxsize=maxsize, ttl=ttl_s)
        self._generation = 0
        self._live = False
        _live_caches.add(self)

    def on_link(self, live: bool) -> None:
        with self._lock:
            self._entries.clear()
            self._generation += 1
            self._live = live

    def forget(self, keys: Iterable[K]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)
            self._generation += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._generation += 1

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._entries.get(key) if self._live else None

    def generation(self) -> int | None:
        """The token to `put` with, or None while messages may be missed (then the
        subscriber is started, and nothing read now is kept)."""
        subscriber()
        with self._lock:
            return self._generation if self._live else None

    def put(self, key: K, value: V, generation: int | None) -> None:
        with self._lock:
            if self._live and generation == self._generation:
                self._entries[key] = value


_live_caches: weakref.WeakSet[LiveCache[object, object]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's subscriber thread is not running here: until the child's own is
    # subscribed, nothing it reads may be believed.
    for cache in list(_live_caches):
        cache._lock = threading.Lock()
        cache.on_link(False)


os.register_at_fork(after_in_child=_after_fork_in_child)


class Waiter:
    """One waiting request: woken with the transfer's final state when the message
    carried it (`final`), else only woken."""

    __slots__ = ("_event", "final")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.final: Final | None = None

    def wait(self, timeout_s: float) -> bool:
        return self._event.wait(timeout_s)

    def wake(self, final: Final | None) -> None:
        self.final = final
        self._event.set()


class SettlementWaiters:
    """The requests waiting for transfers to become final, woken by announcements."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, list[Waiter]] = {}

    def wake(self, data: bytes) -> None:
        announced = _parse_announcement(data)
        with self._lock:
            woken = [
                (waiter, announced[transfer_id])
                for transfer_id in announced.keys() & self._waiters.keys()
                for waiter in self._waiters.pop(transfer_id)
            ]
        for waiter, final in woken:
            waiter.wake(final)

    def register(self, transfer_id: int) -> Waiter:
        """Start listening for `transfer_id`; read the transfer again after this."""
        # Subscribing takes a round trip; a waiter registered before it would miss
        # announcements, so wait briefly for the first subscription.
        subscriber().wait_subscribed(timeout_s=1)
        waiter = Waiter()
        with self._lock:
            self._waiters.setdefault(transfer_id, []).append(waiter)
        return waiter

    def unregister(self, transfer_id: int, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(transfer_id)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[transfer_id]


_waiters = SettlementWaiters()
subscribe(CHANNEL, Subscription(_waiters.wake))


def listener() -> SettlementWaiters:
    """The process's waiters for settlement announcements."""
    return _waiters
