"""Redis pub/sub: any process publishes (best effort); the web processes listen.

Each web process keeps one subscriber thread on one connection. Modules register
the channels they need at import time (`subscribe`), before the thread starts; it
hands every message to its channel's handler, and tells every channel when
messages may have been missed (the connection was lost, or is back), so that
whatever a handler keeps can be dropped (common.live_cache).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

from common.redis_clients import shared_redis
from common.settings import get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")


def _publisher() -> redis.Redis:
    return shared_redis("notify", 1)


def publish(channel: str, message: str) -> None:
    """Best effort: whoever subscribes copes with a lost message."""
    try:
        _publisher().publish(channel, message)
    except redis.RedisError as error:
        log.warning("message on %s lost: %s", channel, error)


def _ignore_link(live: bool) -> None:
    return None


@dataclass(frozen=True)
class Subscription:
    on_message: Callable[[bytes], None]
    # Called with False when the connection is lost and with True once subscribed
    # again: between the two, messages were missed.
    on_link: Callable[[bool], None] = _ignore_link


def text_of(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Subscriber:
    """One pub/sub connection and the thread reading it, for a fixed set of channels."""

    def __init__(self, redis_url: str, channels: dict[str, Subscription]) -> None:
        self._redis_url = redis_url
        self._channels = dict(channels)
        self._lock = threading.Lock()
        # PubSub.close is not thread-safe, and stop() closes from another thread while
        # the listener closes on its way out.
        self._close_lock = threading.Lock()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._pubsub: redis.client.PubSub | None = None
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        """End the thread (tests: a process's own subscriber lives as long as it)."""
        self._stopping.set()
        pubsub = self._pubsub
        if pubsub is not None:
            self._close(pubsub)

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
                channel = text_of(message["channel"])
                kind = text_of(message["type"])
                if kind == "subscribe":
                    # Live only once the server confirmed every channel: a message
                    # published before that would be missed.
                    unconfirmed.discard(channel)
                    if not unconfirmed:
                        self._set_live(True)
                elif kind == "message" and channel in self._channels:
                    self._handle(self._channels[channel].on_message, message["data"])
        finally:
            self._close(pubsub)
            client.close()

    def _close(self, pubsub: redis.client.PubSub) -> None:
        with self._close_lock:
            pubsub.close()

    def _set_live(self, live: bool) -> None:
        if not live:
            self._subscribed.clear()
        for subscription in self._channels.values():
            self._handle(subscription.on_link, live)
        if live:
            self._subscribed.set()

    @staticmethod
    def _handle(handler: Callable[[T], None], argument: T) -> None:
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
