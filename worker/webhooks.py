"""Webhook delivery tasks: one attempt per message, and beat's sweep of due deliveries.

They run in the delivery worker (`./run.sh webhooks`: a thread pool consuming only the
webhooks queue), so a slow receiver holds a delivery thread, never a settlement. The
schedule is in the database (common.webhooks): a message only says "delivery N may be
due"; a duplicate, late or lost message changes nothing that the sweep does not repair.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from celery import Task
from sqlalchemy.orm import Session

from common import broker
from common.db import is_outage, settlement_transaction
from common.events import event_json
from common.settings import get_settings
from common.webhooks import (
    AttemptResult,
    Claim,
    claim_delivery,
    fail_delivery,
    post_event,
    record_attempt,
    retry_delay,
    sweep_deliveries,
)
from worker.tasks import remit_task

log = logging.getLogger(__name__)


@remit_task(broker.DELIVER)
def deliver_webhook(self: Task, delivery_id: int, token: str | None = None) -> str:
    """Make one attempt at delivery `delivery_id` if it is due and free (or leased to
    this message: `token`, from the sweep); record it and schedule the next. Returns the
    delivery's state after it, or "skipped"."""
    settings = get_settings()
    lease = _token(token)

    def claim(session: Session) -> tuple[Claim, str | None] | None:
        claimed = claim_delivery(session, delivery_id, lease, settings.webhook_lease_s)
        if claimed is None:
            return None
        event = event_json(session, claimed.event_id)
        if event is None:
            fail_delivery(session, claimed)
            return claimed, None
        return claimed, json.dumps(event, separators=(",", ":"))

    try:
        claimed = settlement_transaction(claim)
        if claimed is None:
            return "skipped"
        held, body = claimed
        if body is None:
            log.warning("webhook delivery %d failed: its event is gone", delivery_id)
            return "failed"
        # No transaction is open while the receiver takes its time.
        result = post_event(
            held.url,
            held.secret,
            str(held.event_id),
            body,
            timeout=settings.webhook_timeout_s,
            allow_loopback=not settings.is_production,
        )
        delay = retry_delay(
            held.attempts + 1, settings.webhook_retry_base_s, settings.webhook_retry_cap_s
        )
        attempt = settlement_transaction(lambda s: record_attempt(s, held, result, delay))
    except Exception as error:
        if not is_outage(error):
            raise
        # The lease runs out and the sweep hands the delivery out again.
        log.warning("webhook delivery %d postponed, database unavailable: %s", delivery_id, error)
        return "postponed"
    _log_attempt(held, result, attempt.state)
    return attempt.state


def _token(token: str | None) -> datetime | None:
    if token is None:
        return None
    try:
        return datetime.fromisoformat(token)
    except (TypeError, ValueError):
        log.error("webhook delivery message with a malformed token ignored")
        return None


def _log_attempt(held: Claim, result: AttemptResult, state: str) -> None:
    # Says where and what happened; never the secret, the signature or the body.
    log.log(
        logging.INFO if result.delivered else logging.WARNING,
        "webhook delivery %d attempt %d: %s",
        held.delivery_id,
        held.attempts + 1,
        state,
        extra={
            "delivery_id": held.delivery_id,
            "webhook_id": held.webhook_id,
            "event_id": held.event_id,
            "status_code": result.status_code,
            "error": result.error,
        },
    )


@remit_task(broker.SWEEP_WEBHOOKS)
def sweep_webhooks(self: Task) -> dict[str, int]:
    """Beat: fail deliveries past their deadline, and hand out the due ones (retries
    whose time has come, messages lost with Redis, attempts of a killed worker)."""
    settings = get_settings()
    try:
        failed, leased = settlement_transaction(
            lambda session: sweep_deliveries(session, settings.webhook_lease_s)
        )
    except Exception as error:
        if not is_outage(error):
            raise
        log.warning("webhook sweep skipped, database unavailable: %s", error)
        return {}
    if failed:
        log.warning("%d webhook deliveries failed: past their 24 h or webhook deleted", failed)
    published = 0
    for delivery_id, lease in leased:
        try:
            broker.send_task(
                broker.DELIVER, [delivery_id, lease.isoformat()], queue=broker.WEBHOOKS_QUEUE
            )
        except Exception as error:
            # Its lease runs out and a later sweep publishes it again.
            log.warning("webhook sweep could not publish: %s", error)
            break
        published += 1
    return {"failed": failed, "published": published}
