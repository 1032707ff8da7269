"""The Celery application: settings that make delivery reliable, and the beat schedule.

`celery --app worker.app worker|beat|flower` all load this module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init
from kombu.transport import redis as kombu_redis

from common.db import dispose_engine
from common.logs import configure_logging
from common.settings import get_settings

settings = get_settings()

app = Celery("remit", broker=settings.redis_url, include=["worker.tasks"])

_transport = {
    # An unacknowledged message (its worker died) is redelivered after this long.
    # No task countdown may exceed it, or Redis would deliver the message early twice.
    "visibility_timeout": settings.visibility_timeout_s,
}

app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    # Acknowledge after the task ran: a worker killed mid-settlement leaves its
    # message in Redis, which delivers it again; settlement is idempotent.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_transport_options=_transport,
    result_backend_transport_options=_transport,
    broker_connection_retry_on_startup=True,
    broker_connection_timeout=3,
    # The web process publishes after commit; with Redis down it must give up fast
    # (the transfer row is the outbox and the sweeper publishes it later).
    task_publish_retry_policy={
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    },
    # Task events for Flower.
    worker_send_task_events=True,
    # No task-sent events: they cost the API a publish per doorbell, and Flower
    # follows tasks from the worker's own received/started/succeeded events.
    worker_concurrency=settings.worker_concurrency,
    worker_hijack_root_logger=False,
    beat_schedule={
        "sweep": {
            "task": "remit.sweep",
            "schedule": settings.sweep_interval_s,
            # A sweep that could not run in time is pointless by the next one.
            "options": {"expires": settings.sweep_interval_s},
        },
    },
)


@setup_logging.connect
def _json_logs(**_: Any) -> None:
    # Connecting to setup_logging tells Celery to leave logging to us.
    configure_logging("beat" if "beat" in sys.argv else "worker")


@worker_process_init.connect
def _fresh_pool_after_fork(**_: Any) -> None:
    # A prefork child must not share the parent's database sockets.
    dispose_engine()


def _closed_broker_connection_is_a_connection_error() -> None:
    """Keep a busy worker alive when the broker connection drops (kombu 5.7.0 bug).

    When Redis goes away while a late-ack task runs, the consumer's cleanup detaches the
    transport from its connection (Connection.collect) and then closes the channel, whose
    restore of the unacknowledged message builds a Redis client from the detached
    connection: AttributeError ('NoneType' object has no attribute 'hostname'), which
    Celery reports as "Unrecoverable error" and the whole worker exits (found by the
    chaos suite: every busy worker died on a Redis restart). Raising a connection error
    there instead is what the cleanup expects and ignores: the worker reconnects, and
    the message stays unacknowledged in Redis, to come back after the visibility
    timeout (the doorbell is idempotent; if Redis lost it, the sweeper rings again).
    The same AttributeError is reported upstream as celery/kombu#582 ("Error on
    restarting Gossip"); drop this when kombu handles it.
    """
    connparams = kombu_redis.Channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise ConnectionError("the broker connection is already closed")
        return connparams(self, asynchronous=asynchronous)

    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


_closed_broker_connection_is_a_connection_error()


def _one_redis_client_per_channel() -> None:
    """Reuse one redis.Redis object per kombu channel and pool (kombu 5.7.0 builds one
    for every command it sends outside the event loop: every task published, every
    task event sent to Flower).

    Building a client (its response-callback tables) costs more than the publish
    itself: it was a tenth of the API's CPU at low rates, where every doorbell is a
    Celery message, and a seventh of the worker's, in its task events. The client is
    thread-safe and holds no connection of its own (they come from the pool); a new
    pool, after a reconnect, gets a new client. `self.pool` is read first, so a closed
    connection still fails as in _closed_broker_connection_is_a_connection_error.
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


_one_redis_client_per_channel()
