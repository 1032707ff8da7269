"""Settlement announcements over Redis pub/sub, for long polling (`?wait=`).

The worker publishes the ids of transfers a batch made final, once it committed.
Each web process keeps one subscriber thread that wakes the requests waiting on
those ids. A lost announcement only makes a waiter sleep until its timeout: the
answer is always read from PostgreSQL afterwards, never from the message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import redis

from common.redis_clients import shared_redis
from common.settings import get_settings

log = logging.getLogger(__name__)

CHANNEL = "remit:transfers:final"


def _publisher() -> redis.Redis:
    return shared_redis("notify", 1)


def announce_final(transfer_ids: Iterable[int]) -> None:
    """Tell waiting requests these transfers are final. Best effort, after commit."""
    ids = ",".join(str(i) for i in transfer_ids)
    if not ids:
        return
    try:
        _publisher().publish(CHANNEL, ids)
    except redis.RedisError as error:
        log.warning("settlement announcement lost (%s); waiters will time out", error)


class SettlementListener:
    """One subscriber thread per process, fanning announcements out to waiting threads."""

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._lock = threading.Lock()
        self._waiters: dict[int, list[threading.Event]] = {}
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._listen, name="settlement-listener", daemon=True
                )
                self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                client = redis.Redis.from_url(self._redis_url, socket_connect_timeout=2)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                for message in pubsub.listen():
                    self._wake(message.get("data", b""))
            except redis.RedisError as error:
                self._subscribed.clear()
                log.warning("settlement listener reconnecting after: %s", error)
                time.sleep(1)

    def _wake(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        ids = [int(part) for part in text.split(",") if part.isdigit()]
        with self._lock:
            for transfer_id in ids:
                for event in self._waiters.pop(transfer_id, ()):
                    event.set()

    def register(self, transfer_id: int) -> threading.Event:
        """Start listening for `transfer_id`; read the transfer again after this."""
        self._ensure_running()
        # Subscribing takes a round trip; a waiter registered before it would miss
        # announcements, so wait briefly for the first subscription.
        self._subscribed.wait(timeout=1)
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(transfer_id, []).append(event)
        return event

    def unregister(self, transfer_id: int, event: threading.Event) -> None:
        with self._lock:
            events = self._waiters.get(transfer_id)
            if events and event in events:
                events.remove(event)
                if not events:
                    del self._waiters[transfer_id]


_listener_lock = threading.Lock()
_listener: SettlementListener | None = None


def listener() -> SettlementListener:
    """The process's one listener (built under a lock: threads race at first use)."""
    global _listener  # noqa: PLW0603 - one per process, built lazily after fork
    with _listener_lock:
        if _listener is None:
            _listener = SettlementListener(get_settings().redis_url)
        return _listener
