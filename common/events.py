"""Placeholder until the events work (branch i15-events) lands: only `event_json`, the
interface the webhook delivery builds its body from. The lead keeps that branch's
module at merge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from common.currencies import get_currency
from common.models import Event, Transfer
from common.money import format_amount


def _timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_json(db: Session, event_id: int) -> dict[str, Any] | None:
    """The event object of docs/api.md, or None when there is no such event."""
    event = db.get(Event, event_id)
    if event is None:
        return None
    transfer = db.get(Transfer, event.transfer_id) if event.transfer_id is not None else None
    data: dict[str, Any] = {}
    if transfer is not None:
        decimals = get_currency(db, transfer.currency).decimals
        data = {
            "id": transfer.id,
            "status": transfer.status,
            "from": transfer.from_account_id,
            "to": transfer.to_account_id,
            "from_user_id": transfer.from_user_id,
            "to_user_id": transfer.to_user_id,
            "currency": transfer.currency,
            "amount": format_amount(transfer.amount, decimals),
            "commission": format_amount(transfer.commission, decimals),
            "comment": transfer.comment,
            "reason": transfer.reason,
            "created_at": _timestamp(transfer.created_at),
            "settled_at": _timestamp(transfer.settled_at),
        }
    return {
        "id": str(event.id),
        "type": event.type,
        "created_at": _timestamp(event.created_at),
        "data": data,
    }
