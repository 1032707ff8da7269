"""The Celery application: settings that make delivery reliable, and the beat schedule.

`celery --app worker.app worker|beat|flower` all load this module. What any
publisher must agree on with the worker (serialization, redelivery, publish retries,
kombu's patches) is in common.broker.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from common import broker
from common.db import dispose_engine
from common.logs import configure_logging
from common.settings import get_settings

settings = get_settings()

app = Celery("remit", broker=settings.redis_url, include=["worker.tasks"])
broker.configure(app)

app.conf.update(
    # Acknowledge after the task ran: a worker killed mid-settlement leaves its
    # message in Redis, which delivers it again; settlement is idempotent.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Task events for Flower.
    worker_send_task_events=True,
    # No task-sent events: they cost the API a publish per doorbell, and Flower
    # follows tasks from the worker's own received/started/succeeded events.
    worker_concurrency=settings.worker_concurrency,
    worker_hijack_root_logger=False,
    beat_schedule={
        "sweep": {
            "task": broker.SWEEP,
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
