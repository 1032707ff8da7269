"""Celery tasks. Thin: they call the ledger and decide what to retry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from celery import Task, shared_task
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.orm import Session

from common import broker
from common.announcements import announce_decided, announce_final, announce_holds
from common.currencies import CurrencyInfo, get_currency, known_currency
from common.db import is_outage, settlement_transaction
from common.doorbells import marks, ring
from common.errors import NotFound
from common.events import publish_deliveries
from common.ledger import (
    BatchResult,
    currencies_due,
    record_failed_attempt,
    reopen_failed,
    settle_batch,
)
from common.logs import request_id as log_context
from common.metrics import record_outcomes
from common.models import SETTLEMENT_ERROR
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)

# A task that keeps finding work re-queues itself after this many batches or a quarter
# of the visibility timeout (at most 30 s), whichever comes first, so one message never
# holds a worker longer than the broker's visibility timeout (a count alone does not
# bound time: slow batches), and a warm shutdown (SIGTERM) waits for one slice of the
# backlog, not for all of it.
MAX_BATCHES_PER_TASK = 50


def max_seconds_per_task(settings: Settings) -> float:
    return min(30.0, settings.visibility_timeout_s / 4)


def remit_task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
    """The house task decorator: late acks, no results, bound to the app that loads
    this module; options that are not Celery's task options fail loudly."""
    unknown = set(options) - set(dir(Task))
    if unknown:
        raise TypeError(f"unknown task options for {name}: {sorted(unknown)}")
    decorator: Callable[[Callable[..., Any]], Task] = shared_task(
        name=name, bind=True, acks_late=True, ignore_result=True, **options
    )
    return decorator


class DatabaseOutage(Exception):
    """The database is unreachable: Celery retries the whole doorbell with backoff."""


@remit_task(broker.SETTLE)
def settle(
    self: Task,
    currency: str,
    transfer_ids: list[int] | None = None,
    request_id: str | None = None,
) -> dict[str, int]:
    """Doorbell: `currency` has pending transfers (`transfer_ids` say which, for logs).

    Settles batches until nothing of the currency is due. Returns at once if
    another settler holds the currency's lock: that one re-checks for pending
    work after each release, so nothing that rang while it ran is missed.

    A batch that fails is retried at half the size, down to a batch of one; a
    transfer that fails alone is charged a failed attempt and backs off, so one
    bad transfer cannot hold up its currency. If the database is unreachable
    the whole doorbell is retried later instead.
    """
    settings = get_settings()
    log_context.set(request_id)
    try:
        return _settle_until_done(settings, currency, transfer_ids)
    except Exception as error:
        marks.not_busy(currency)
        if not is_outage(error):
            raise
        log.warning("database unavailable while settling %s: %s", currency, error)
        # The whole doorbell again, with jittered exponential backoff capped well below
        # the visibility timeout (common.broker), so that Redis never also redelivers it.
        countdown = get_exponential_backoff_interval(
            factor=1,
            retries=self.request.retries,
            maximum=min(60, settings.visibility_timeout_s // 4),
            full_jitter=True,
        )
        raise self.retry(
            exc=DatabaseOutage(str(error)),
            countdown=countdown,
            max_retries=settings.settle_max_retries,
        ) from error
    finally:
        log_context.set(None)


def _settle_until_done(
    settings: Settings, currency: str, transfer_ids: list[int] | None
) -> dict[str, int]:
    info = _currency(currency)
    if info is None:
        log.error("doorbell for unknown currency %r ignored", currency)
        return {"settled": 0, "rejected": 0}
    marks.leave(currency)
    settled = rejected = 0
    limit = settings.settle_batch_size
    deadline = time.monotonic() + max_seconds_per_task(settings)
    for _ in range(MAX_BATCHES_PER_TASK):
        if time.monotonic() >= deadline:
            ring(currency)
            break
        try:
            result = settlement_transaction(partial(_settle_one_batch, currency, limit, info))
        except Exception as error:
            if is_outage(error):
                raise
            limit = _after_failed_batch(settings, currency, limit, error)
            continue
        if result.claimed is None:
            break
        # After commit: long-polling clients answer with what the batch decided, and
        # webhooks get the batch's events.
        if result.settled_at is not None:
            announce_decided(
                ((d.transfer_id, d.status.value, d.reason) for d in result.decisions),
                result.settled_at,
            )
            announce_holds(sorted({d.hold_id for d in result.hold_decisions}))
        publish_deliveries(result.deliveries)
        _log_decisions(result)
        record_outcomes(
            (d.status, d.reason, result.ages_s.get(d.transfer_id, 0.0)) for d in result.decisions
        )
        settled += result.settled
        rejected += result.rejected
        # Grow back after a failure shrank the batch: the bad transfer may be behind us.
        limit = min(settings.settle_batch_size, limit * 2)
        if result.claimed == 0 and not marks.take(currency):
            break
        if 0 < result.claimed < settings.settle_batch_size // 20:
            # A small batch: let a few more transfers arrive before the next claim, or
            # at a steady trickle a batch's fixed cost (transaction, lock, claim, Redis
            # round trips) is most of the settler's work (see docs/decisions/). No lock
            # is held while it waits.
            time.sleep(settings.settle_gather_s)
    else:
        ring(currency)
    if settled or rejected:
        log.info(
            "settled %d, rejected %d %s transfers",
            settled,
            rejected,
            currency,
            extra={"doorbell_transfer_ids": transfer_ids},
        )
    return {"settled": settled, "rejected": rejected}


def _after_failed_batch(settings: Settings, currency: str, limit: int, error: Exception) -> int:
    """Halve the batch; at a batch of one, charge the failure to that transfer."""
    if limit > 1:
        log.warning("batch of %d %s transfers failed (%r); halving", limit, currency, error)
        return limit // 2
    attempt = settlement_transaction(
        lambda session: record_failed_attempt(
            session,
            currency,
            f"{type(error).__name__}: {error}",
            max_attempts=settings.settle_max_attempts,
            retry_failed_after_s=settings.failed_retry_interval_s,
        )
    )
    if attempt is not None:
        log.error(
            "settlement attempt %d of transfer %d failed%s: %r",
            attempt.attempts,
            attempt.transfer_id,
            "; marked failed" if attempt.failed else "",
            error,
            extra={"transfer_id": attempt.transfer_id},
        )
        if attempt.failed:
            announce_final([attempt.transfer_id])
            publish_deliveries(attempt.deliveries)
            record_outcomes([("failed", SETTLEMENT_ERROR, attempt.age_s)])
    return settings.settle_batch_size


def _log_decisions(result: BatchResult) -> None:
    """One line per batch, listing each transfer with the request id it was accepted
    under, so that grepping a request id (or `"id": N`) finds its settlement. A line per
    transfer would cost the settler much of its time (see docs/decisions/)."""
    if not result.decisions or not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "batch of %d %s transfers final",
        len(result.decisions),
        result.currency,
        extra={
            "transfers": [
                {
                    "id": decision.transfer_id,
                    "status": str(decision.status),
                    "reason": decision.reason,
                    "request_id": result.request_ids.get(decision.transfer_id),
                }
                for decision in result.decisions
            ]
        },
    )


def _currency(code: str) -> CurrencyInfo | None:
    # Every doorbell asks: answer from the process's cache without building a session.
    cached = known_currency(code)
    if cached is not None:
        return cached
    try:
        return settlement_transaction(lambda session: get_currency(session, code))
    except NotFound:
        return None


def _settle_one_batch(
    currency: str, limit: int, info: CurrencyInfo, session: Session
) -> BatchResult:
    # marks.clear runs inside the transaction, once the lock is held and before the
    # claim; it is bounded and never raises (docs/decisions/0017).
    return settle_batch(
        session,
        currency,
        limit,
        info.commission_account_id,
        on_locked=lambda: marks.clear(currency),
    )


@remit_task(broker.SWEEP)
def sweep(self: Task) -> dict[str, int]:
    """Beat: ring for transfers whose doorbell was lost, and retry failed ones when due."""
    settings = get_settings()
    log_context.set(None)

    def reopen_and_find_due(session: Session) -> tuple[list[tuple[int, str]], dict[str, int]]:
        reopened = reopen_failed(session, settings.failed_retry_window_s)
        return reopened, currencies_due(session, settings.sweep_pending_after_s)

    try:
        reopened, due = settlement_transaction(reopen_and_find_due)
    except Exception as error:
        if not is_outage(error):
            raise
        # Nothing is lost: the next sweep, a few seconds on, looks again.
        log.warning("sweep skipped, database unavailable: %s", error)
        return {}
    for transfer_id, currency in reopened:
        log.warning("retrying failed transfer %d", transfer_id, extra={"transfer_id": transfer_id})
        due.setdefault(currency, 0)
    for currency, count in sorted(due.items()):
        if count:
            log.warning("%d %s transfers or holds overdue: ringing again", count, currency)
        ring(currency)
    return due
