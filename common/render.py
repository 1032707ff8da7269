"""Resources as the API shows them, where the web and the worker both need them.

A transfer is rendered by the web (its routes) and inside event bodies, which the
worker builds for webhook deliveries; so its representation lives below both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from common.currencies import get_currency
from common.db import Db
from common.holds import HoldRow
from common.money import format_amount
from common.transfers import TransferRow


def timestamp(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with microseconds, as every timestamp of the API."""
    if moment is None:
        return None
    # Not strftime("%Y"): glibc writes year 999 as "999", and ?at= can ask for such years.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def transfer_json(db: Db, transfer: TransferRow) -> dict[str, Any]:
    """A transfer's resource, from its row."""
    decimals = get_currency(db, transfer.currency).decimals
    return {
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
        "created_at": timestamp(transfer.created_at),
        "settled_at": timestamp(transfer.settled_at),
        "kind": transfer.kind,
        "refund_of": transfer.refund_of,
        "refunded": format_amount(transfer.refunded, decimals),
        "hold_id": transfer.hold_id,
        "destination": transfer.destination,
    }


def hold_json(db: Db, hold: HoldRow) -> dict[str, Any]:
    """A hold's resource, from its row (docs/api.md "Holds")."""
    decimals = get_currency(db, hold.currency).decimals
    captured = hold.captured_amount
    return {
        "id": hold.id,
        "status": hold.status,
        "from": hold.from_account_id,
        "to": hold.to_account_id,
        "from_user_id": hold.from_user_id,
        "to_user_id": hold.to_user_id,
        "currency": hold.currency,
        "amount": format_amount(hold.amount, decimals),
        "commission": format_amount(hold.commission, decimals),
        "captured_amount": None if captured is None else format_amount(captured, decimals),
        "transfer_id": hold.transfer_id,
        "reason": hold.reason,
        "comment": hold.comment,
        "created_at": timestamp(hold.created_at),
        "expires_at": timestamp(hold.expires_at),
        "updated_at": timestamp(hold.updated_at),
    }
