"""The Celery application: settings that make delivery reliable, and the beat schedule.

`create_celery(settings)` builds the app (settlement in worker.tasks, webhook deliveries
in worker.webhooks, on a queue of their own); `app`, built from the process's settings,
is the entry point that `celery --app worker.app worker|beat|flower` load (as web.wsgi is
the API's). What any publisher must agree on with the worker (serialization,
redelivery, publish retries, kombu's patches) is in common.broker.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from common import broker
from common.db import dispose_engine
from common.logs import configure_logging
from common.settings import Settings, get_settings


def create_celery(settings: Settings) -> Celery:
    """The worker's Celery app, configured from `settings`."""
    tasks = ["worker.tasks", "worker.webhooks"]
    celery = Celery("remit", broker=settings.redis_url, include=tasks)
    broker.configure(celery, settings)
    celery.conf.update(
        # Acknowledge after the task ran: a worker killed mid-settlement leaves its
        # message in Redis, which delivers it again; settlement is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Task events for Flower; no task-sent events, which would cost the API a
        # publish per doorbell (Flower follows the worker's own events).
        worker_send_task_events=True,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep": {
                "task": broker.SWEEP,
                "schedule": settings.sweep_interval_s,
                # A sweep that could not run in time is pointless by the next one.
                "options": {"expires": settings.sweep_interval_s},
            },
            # Run by the delivery worker, on its queue: due retries, lost messages.
            "sweep-webhooks": {
                "task": broker.SWEEP_WEBHOOKS,
                "schedule": settings.webhook_sweep_interval_s,
                "options": {
                    "expires": settings.webhook_sweep_interval_s,
                    "queue": broker.WEBHOOKS_QUEUE,
                },
            },
        },
    )
    return celery


app = create_celery(get_settings())


def _json_logs(**_: Any) -> None:
    configure_logging("beat" if "beat" in sys.argv else "worker")


def _fresh_pool_after_fork(**_: Any) -> None:
    # A prefork child must not share the parent's database sockets.
    dispose_engine()


# Connecting to setup_logging tells Celery to leave logging to us.
setup_logging.connect(_json_logs)
worker_process_init.connect(_fresh_pool_after_fork)
