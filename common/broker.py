"""The Celery broker as every process sees it: one configuration, and the producer
that sends tasks by name.

The worker (worker.app) adds to `configure` what only a consumer needs. Everything
else that publishes (the API's doorbells, beat's sweep, the operator's CLI) goes
through `producer()`, which knows the tasks by name only and imports no worker code.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery

from common import kombu_patches
from common.settings import Settings, get_settings

# The tasks the worker runs (worker.tasks), by the names they are published under.
SETTLE = "remit.settle"
SWEEP = "remit.sweep"
DELIVER = "remit.deliver_webhook"
SWEEP_WEBHOOKS = "remit.sweep_webhooks"
# Webhook deliveries have their own queue, so a slow receiver never holds a settlement.
WEBHOOKS_QUEUE = "webhooks"


def configure(app: Celery, settings: Settings) -> None:
    """What producer and worker must agree on (`app` was built with the broker URL):
    serialization, redelivery, how long a publish may retry; and kombu's patches."""
    transport = {
        # An unacknowledged message (its worker died) is redelivered after this long.
        # No task countdown may exceed it, or Redis would deliver the message early twice.
        "visibility_timeout": settings.visibility_timeout_s,
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        task_ignore_result=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
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
    )
    kombu_patches.apply()


_lock = threading.Lock()
_producer: Celery | None = None


def producer() -> Celery:
    """The process's Celery app for publishing, built on first use."""
    global _producer  # noqa: PLW0603 - one per process, built lazily after settings load
    app = _producer
    if app is not None:
        return app
    with _lock:
        if _producer is None:
            # Not the "current" app: in a worker process that is worker.app's.
            settings = get_settings()
            built = Celery("remit", broker=settings.redis_url, set_as_current=False)
            configure(built, settings)
            _producer = built
        return _producer


def send_task(name: str, args: Sequence[Any], queue: str | None = None) -> None:
    """Publish task `name` (on `queue`, else the default one), retrying as configured;
    raises kombu's OperationalError or OSError when the broker stays unreachable."""
    options = {} if queue is None else {"queue": queue}
    producer().send_task(name, args, retry=True, ignore_result=True, **options)
