"""Process-local caches kept true by pub/sub messages (common.pubsub)."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeVar

from cachetools import TTLCache

from common.pubsub import subscriber

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


_live_caches: weakref.WeakSet[LiveCache[Any, Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's subscriber thread is not running here: until the child's own is
    # subscribed, nothing it reads may be believed.
    for cache in list(_live_caches):
        cache._lock = threading.Lock()
        cache.on_link(False)


os.register_at_fork(after_in_child=_after_fork_in_child)
