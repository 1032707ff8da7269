"""Two fixes to kombu 5.7.0's Redis transport, applied by every process that talks to
the broker: the worker (worker.app) and whoever publishes (common.broker).

Both replace a method of kombu's Redis Channel class, so they apply to the whole
process; `apply()` may be called any number of times.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

_lock = threading.Lock()
_applied = False


def apply() -> None:
    """Patch kombu's Redis channel, once per process."""
    global _applied  # noqa: PLW0603 - a class is patched once per process
    with _lock:
        if _applied:
            return
        _closed_broker_connection_is_a_connection_error()
        _one_redis_client_per_channel()
        _applied = True


def _closed_broker_connection_is_a_connection_error() -> None:
    """Keep a busy worker alive when the broker connection drops.

    When Redis goes away while a late-ack task runs, the consumer's cleanup detaches the
    transport from its connection (Connection.collect) and then closes the channel, whose
    restore of the unacknowledged message builds a Redis client from the detached
    connection: AttributeError ('NoneType' object has no attribute 'hostname'), which
    Celery reports as "Unrecoverable error", and the whole worker exits (found by the
    chaos suite). Raising a connection error there instead is what the cleanup expects
    and ignores: the worker reconnects, and the message stays unacknowledged in Redis, to
    come back after the visibility timeout (the doorbell is idempotent; if Redis lost it,
    the sweeper rings again). Reported upstream as celery/kombu#582 ("Error on
    restarting Gossip"); drop this when kombu handles it.
    """
    connparams: Callable[..., Any] = kombu_redis.Channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise ConnectionError("the broker connection is already closed")
        return connparams(self, asynchronous=asynchronous)

    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


def _one_redis_client_per_channel() -> None:
    """Reuse one redis.Redis object per kombu channel and pool: kombu builds one for
    every command it sends outside the event loop (every task published, every task
    event sent to Flower), and building one costs more than the publish itself (see
    docs/decisions/).

    The client is thread-safe and holds no connection of its own (they come from the
    pool); a new pool, after a reconnect, gets a new client. `self.pool` is read first,
    so a closed connection still fails as in _closed_broker_connection_is_a_connection_error.
    """

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_remit_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_remit_client"] = cached
        yield cached[1]

    kombu_redis.Channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]
