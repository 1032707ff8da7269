"""Celery tasks. Thin: they call the ledger and decide what to retry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from common.currencies import CurrencyInfo, get_currency
from common.db import retrying, transaction
from common.errors import NotFound
from common.ledger import BatchResult, pending_exists, settle_batch
from common.logs import request_id as log_context
from common.notify import announce_final
from common.settings import get_settings
from worker.app import app

log = logging.getLogger(__name__)

settings = get_settings()

# A task that keeps finding work re-queues itself after this many batches, so one
# message never holds a worker longer than the broker's visibility timeout.
MAX_BATCHES_PER_TASK = 50

_HOUSE_OPTIONS = frozenset(
    {"autoretry_for", "max_retries", "retry_backoff", "retry_backoff_max", "retry_jitter"}
)


def remit_task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
    """The house task decorator: late acks, no results, and loud typos in options."""
    unknown = set(options) - _HOUSE_OPTIONS
    if unknown:
        raise TypeError(f"unknown task options for {name}: {sorted(unknown)}")
    return app.task(name=name, bind=True, acks_late=True, ignore_result=True, **options)


@remit_task(
    "remit.settle",
    # Database outages are transient: back off and try again. The backoff cap
    # stays well below the visibility timeout (see worker.app).
    autoretry_for=(OperationalError,),
    max_retries=settings.settle_max_retries,
    retry_backoff=1,
    retry_backoff_max=min(60, settings.visibility_timeout_s // 4),
    retry_jitter=True,
)
def settle(
    self: Task,
    currency: str,
    transfer_ids: list[int] | None = None,
    request_id: str | None = None,
) -> dict[str, int]:
    """Doorbell: `currency` has pending transfers (`transfer_ids` say which, for logs).

    Settles batches until nothing of the currency is pending. Returns at once if
    another settler holds the currency's lock: that one re-checks for pending
    work after each release, so nothing that rang while it ran is missed.
    """
    # The doorbell's request id, for this task's own log lines.
    log_context.set(request_id)
    info = _currency(currency)
    if info is None:
        log.error("doorbell for unknown currency %r ignored", currency)
        return {"settled": 0, "rejected": 0}
    settled = rejected = 0
    for _ in range(MAX_BATCHES_PER_TASK):
        result = retrying(lambda: _settle_one_batch(currency, info.commission_account_id))
        if result.claimed is None:
            break
        # After commit: long-polling clients re-read the transfer from the database.
        announce_final(result.final_ids)
        settled += result.settled
        rejected += result.rejected
        if result.claimed == 0 and not _pending_exists(currency):
            break
    else:
        ring(currency)
    if settled or rejected:
        log.info(
            "settled %d, rejected %d %s transfers (doorbell for %s)",
            settled,
            rejected,
            currency,
            transfer_ids,
        )
    return {"settled": settled, "rejected": rejected}


def _currency(code: str) -> CurrencyInfo | None:
    try:
        with transaction() as session:
            return get_currency(session, code)
    except NotFound:
        return None


def _settle_one_batch(currency: str, commission_account_id: int) -> BatchResult:
    with transaction() as session:
        return settle_batch(session, currency, settings.settle_batch_size, commission_account_id)


def _pending_exists(currency: str) -> bool:
    # A fresh transaction after the batch released its lock: it sees every transfer
    # committed before a concurrent doorbell found the lock taken.
    with transaction() as session:
        return pending_exists(session, currency)


@remit_task("remit.sweep")
def sweep(self: Task) -> dict[str, int]:
    """Beat: ring again for transfers pending longer than a doorbell should take."""
    log_context.set(None)
    with transaction() as session:
        rows = session.execute(
            text(
                "SELECT currency, count(*) FROM transfers WHERE status = 'pending' "
                "AND created_at < clock_timestamp() - make_interval(secs => :age) "
                "GROUP BY currency ORDER BY currency"
            ),
            {"age": settings.sweep_pending_after_s},
        ).all()
    for currency, count in rows:
        log.warning("%d %s transfers pending too long: ringing again", count, currency)
        ring(currency)
    return {currency: count for currency, count in rows}  # noqa: C416 - rows are Row tuples


def ring(currency: str, transfer_ids: list[int] | None = None) -> bool:
    """Publish a settlement doorbell. Only ever called after the transfer committed.

    Returns False if the broker is unreachable: the row stays pending and the
    sweeper rings for it later, so the caller need not fail.
    """
    try:
        settle.apply_async((currency, transfer_ids, log_context.get()), retry=True)
    except (BrokerError, OSError) as error:
        log.warning("doorbell for %s not published (%s); the sweeper will ring", currency, error)
        return False
    return True
