"""Events: each final outcome, told to the users it concerns (docs/api.md "Events").

Written in the transaction of the outcome, in bulk, by the statements that decide it
(common.ledger embeds `TRANSFER_EVENTS`): an outcome without its event, or an event
of an outcome that rolled back, cannot exist. The same statement writes one
`webhook_deliveries` row per event and matching enabled webhook (the fan-out); after
COMMIT the caller publishes one delivery task per row (`publish_deliveries`), and a
lost publish is found again in the database by the delivery sweep.

An event's body shows its transfer as it was when the event happened. Only a
transfer's status, reason and settled_at ever change, and the event's type says what
they were then, so the body is derived from the type and the transfer's row instead of
being stored (docs/decisions/0032).

The feed lists a user's events in commit order: by (txid, id), and only those of
transactions older than every transaction still running (common.models.Event), so a
client that pages with `after` never skips an event that commits later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from kombu.exceptions import OperationalError as BrokerError
from psycopg.rows import args_row, tuple_row
from sqlalchemy import (
    BigInteger,
    Select,
    Table,
    Text,
    bindparam,
    cast,
    func,
    select,
    tuple_,
)

from common import broker
from common.db import Db, execute_direct
from common.errors import Invalid
from common.holds import HOLD_COLUMNS, HoldRow
from common.models import (
    SETTLEMENT_ERROR,
    Event,
    EventType,
    Hold,
    HoldStatus,
    Transfer,
    TransferKind,
    TransferStatus,
)
from common.render import hold_json, timestamp, transfer_json
from common.transfers import TransferRow

log = logging.getLogger(__name__)

# A delivery is attempted until this long after its event (docs/api.md "Webhooks").
DELIVERY_WINDOW = "24 hours"

_FINAL = ", ".join(f"'{s.value}'" for s in TransferStatus if s != TransferStatus.PENDING)


def _event_ctes(*, holds: bool) -> str:
    """Two CTEs to append (after a comma) to a WITH clause whose CTE `decided` returns
    (id, status, from_user_id, to_user_id, kind) of the transfers it has just changed,
    and, with `holds`, whose CTE `holds_decided` returns (id, status, from_user_id,
    evented) of the holds it has just changed:
    - `evented` inserts their events: `transfer.<status>` to the payer for each final
      status; `transfer.received` to the payee of a settled transfer, refund or capture
      between two users (a payout's payee is the outside world); `hold.<status>` to the
      maker of each hold whose change is `evented`. A row still pending gets none.
      Event ids follow the transfers' order, then the holds'.
    - `delivered` inserts one delivery per event and enabled webhook of its user that
      asked for its type (or "*"), and returns their ids. With no webhooks registered,
      that is one probe of an empty index per event."""
    hold_events = (
        "  UNION ALL"
        "  SELECT from_user_id, 'hold.' || status, NULL::bigint, id, 2 FROM holds_decided"
        "  WHERE evented"
        if holds
        else ""
    )
    return (
        "evented AS ("
        " INSERT INTO events (user_id, type, transfer_id, hold_id)"
        " SELECT e.user_id, e.type, e.transfer_id, e.hold_id FROM ("
        "  SELECT from_user_id, 'transfer.' || status, id, NULL::bigint, 0 FROM decided"
        f"  WHERE status IN ({_FINAL})"
        "  UNION ALL"
        f"  SELECT to_user_id, '{EventType.TRANSFER_RECEIVED.value}', id, NULL::bigint, 1"
        f"  FROM decided WHERE status = '{TransferStatus.SETTLED.value}'"
        f"  AND to_user_id <> from_user_id AND kind <> '{TransferKind.PAYOUT.value}'"
        + hold_events
        + " ) AS e(user_id, type, transfer_id, hold_id, n)"
        " ORDER BY e.n = 2, coalesce(e.transfer_id, e.hold_id), e.n"
        " RETURNING id, user_id, type, created_at"
        "), delivered AS ("
        " INSERT INTO webhook_deliveries (webhook_id, event_id, deadline_at)"
        f" SELECT w.id, evented.id, evented.created_at + interval '{DELIVERY_WINDOW}'"
        " FROM evented JOIN webhooks w ON w.user_id = evented.user_id"
        " WHERE w.enabled AND w.events && ARRAY['*', evented.type::text]"
        " ORDER BY evented.id, w.id"
        " RETURNING id"
        ")"
    )


# For statements that decide transfers only (a failed attempt), and for settlement.
TRANSFER_EVENTS = _event_ctes(holds=False)
LEDGER_EVENTS = _event_ctes(holds=True)

# The ids of the deliveries `delivered` wrote, for the statement's final SELECT.
DELIVERY_IDS = "ARRAY(SELECT id FROM delivered ORDER BY id)"


def publish_deliveries(delivery_ids: Sequence[int]) -> None:
    """After COMMIT: one delivery task per delivery, on the webhooks' own queue.

    Best effort: with the broker unreachable the rest are not tried (each attempt
    would wait for its publish retries) and the delivery sweep sends them later."""
    for sent, delivery_id in enumerate(delivery_ids):
        try:
            broker.send_task(broker.DELIVER, [delivery_id], queue=broker.WEBHOOKS_QUEUE)
        except (BrokerError, OSError) as error:
            log.warning(
                "%d webhook deliveries not published (the sweep will): %s",
                len(delivery_ids) - sent,
                error,
            )
            return


# --- Reading ----------------------------------------------------------------------------

TRANSFERS: Table = Transfer.__table__  # type: ignore[assignment]  # a mapped class's table
HOLDS: Table = Hold.__table__  # type: ignore[assignment]
_TRANSFER_COLUMNS = tuple(TRANSFERS.c[name] for name in TransferRow._fields)
_TRANSFER_WIDTH = len(_TRANSFER_COLUMNS)
# An event is of a transfer or of a hold (events.hold_id): both are joined (LEFT), and
# the one it is of has its columns filled.
_OBJECT_COLUMNS = (*_TRANSFER_COLUMNS, *HOLD_COLUMNS)


class EventRow(NamedTuple):
    id: int
    type: str
    created_at: datetime
    transfer: TransferRow | None
    hold: HoldRow | None = None


def _event_row(event_id: int, event_type: str, created_at: datetime, *columns: Any) -> EventRow:
    transfer, hold = columns[:_TRANSFER_WIDTH], columns[_TRANSFER_WIDTH:]
    return EventRow(
        event_id,
        event_type,
        created_at,
        None if transfer[0] is None else TransferRow(*transfer),
        None if hold[0] is None else HoldRow(*hold),
    )


_EVENT_ROWS = args_row(_event_row)


def transfer_at(transfer: TransferRow, event_type: str) -> TransferRow:
    """The transfer as it was when an event of `event_type` happened.

    settled and rejected are final: the row still shows them. A failed transfer may
    have been retried since (pending, then settled or rejected), so a
    `transfer.failed` event shows the failure whatever the row says now. Refunds come
    only after a transfer settled, so at any of its events it had none."""
    transfer = transfer._replace(refunded=0, refunds_claimed=0)
    if event_type == EventType.TRANSFER_FAILED:
        return transfer._replace(
            status=TransferStatus.FAILED.value, reason=SETTLEMENT_ERROR, settled_at=None
        )
    return transfer


def hold_at(hold: HoldRow, event_type: str, created_at: datetime) -> HoldRow:
    """The hold as it was when an event of `event_type` happened (at `created_at`).

    rejected, captured, voided and expired are final: the row still shows them. A
    `hold.held` event shows the hold as it was reserved, whatever came since: held,
    not captured, no reason, last changed then."""
    if event_type == EventType.HOLD_HELD:
        return hold._replace(
            status=HoldStatus.HELD.value,
            captured_amount=None,
            transfer_id=None,
            reason=None,
            void_requested_at=None,
            updated_at=created_at,
        )
    return hold


def render_event(db: Db, event: EventRow) -> dict[str, Any]:
    """The event object of the API and of webhook bodies."""
    if event.hold is not None:
        data = hold_json(db, hold_at(event.hold, event.type, event.created_at))
    else:
        assert event.transfer is not None, "an event is of a transfer or of a hold"
        data = transfer_json(db, transfer_at(event.transfer, event.type))
    return {
        "id": str(event.id),
        "type": event.type,
        "created_at": timestamp(event.created_at),
        "data": data,
    }


_BY_ID = (
    select(Event.id, Event.type, Event.created_at, *_OBJECT_COLUMNS)
    .outerjoin(TRANSFERS, TRANSFERS.c.id == Event.transfer_id)
    .outerjoin(HOLDS, HOLDS.c.id == Event.hold_id)
    .where(Event.id == bindparam("id"))
)


def event_json(db: Db, event_id: int) -> dict[str, Any] | None:
    """Event `event_id` as its JSON object (the body of its webhook deliveries), or
    None when there is no such event."""
    event = execute_direct(db, _BY_ID, {"id": event_id}, _EVENT_ROWS).fetchone()
    return None if event is None else render_event(db, event)


# Transactions older than this have all ended: no event with a smaller txid can still
# commit. Stable within a statement, so an index bound.
_HORIZON = cast(cast(func.pg_snapshot_xmin(func.pg_current_snapshot()), Text), BigInteger)

_POSITION = select(Event.txid).where(
    Event.id == bindparam("after"), Event.user_id == bindparam("user_id")
)


def _page(*, after: bool, typed: bool) -> Select[Any]:
    """One page of a user's events in feed order: the ids from the index alone
    (ix_events_user_id_txid_id includes the type), then their rows and their transfers
    or holds."""
    conditions = [Event.user_id == bindparam("user_id"), Event.txid < _HORIZON]
    if after:
        conditions.append(
            tuple_(Event.txid, Event.id) > tuple_(bindparam("after_txid"), bindparam("after"))
        )
    if typed:
        conditions.append(Event.type == bindparam("type"))
    ids = (
        select(Event.txid, Event.id)
        .where(*conditions)
        .order_by(Event.txid, Event.id)
        .limit(bindparam("limit"))
        .subquery()
    )
    return (
        select(Event.id, Event.type, Event.created_at, *_OBJECT_COLUMNS)
        .select_from(ids)
        .join(Event, Event.id == ids.c.id)
        .outerjoin(TRANSFERS, TRANSFERS.c.id == Event.transfer_id)
        .outerjoin(HOLDS, HOLDS.c.id == Event.hold_id)
        .order_by(ids.c.txid, ids.c.id)
    )


# Built and compiled once each: with and without `after`, with and without `type`.
_PAGES = {
    (after, typed): _page(after=after, typed=typed)
    for after in (False, True)
    for typed in (False, True)
}


def list_events(
    db: Db, user_id: int, *, after: int | None, event_type: str | None, limit: int
) -> list[EventRow]:
    """Up to `limit` of the user's events in feed order, after event `after` (exclusive)
    when given, of one type when given. An `after` that is not one of the user's events
    is refused (`invalid_query`): a position in another stream means nothing here."""
    params: dict[str, Any] = {"user_id": user_id, "limit": limit}
    if after is not None:
        position = execute_direct(
            db, _POSITION, {"after": after, "user_id": user_id}, tuple_row
        ).fetchone()
        if position is None:
            raise Invalid("invalid_query", f"after: {after} is not one of this user's events")
        params.update(after=after, after_txid=position[0])
    if event_type is not None:
        params["type"] = event_type
    statement = _PAGES[(after is not None, event_type is not None)]
    return execute_direct(db, statement, params, _EVENT_ROWS).fetchall()
