"""Events, the pure parts: what an event shows of its transfer, and one list of types."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from common.events import TRANSFER_EVENTS, transfer_at
from common.models import SETTLEMENT_ERROR, EventType, TransferStatus
from common.transfers import TransferRow
from web import openapi
from web.fields import EVENT_TYPES

# hypothesis takes naive bounds and adds the zone itself.
moments = st.datetimes(
    min_value=datetime(2026, 1, 1),  # noqa: DTZ001
    max_value=datetime(2030, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
transfers = st.builds(
    TransferRow,
    id=st.integers(1, 2**63 - 1),
    status=st.sampled_from([s.value for s in TransferStatus]),
    from_account_id=st.integers(1, 1000),
    to_account_id=st.integers(1, 1000),
    from_user_id=st.integers(1, 1000),
    to_user_id=st.integers(1, 1000),
    currency=st.sampled_from(["USD", "EUR", "CNY"]),
    amount=st.integers(1, 10**17),
    commission=st.integers(0, 10**15),
    comment=st.text(max_size=20),
    reason=st.sampled_from([None, "insufficient_funds", "balance_limit", SETTLEMENT_ERROR]),
    requested_by=st.integers(1, 1000),
    idempotency_key=st.none(),
    request_fingerprint=st.none(),
    request_id=st.none(),
    attempts=st.integers(0, 10),
    last_error=st.none() | st.text(max_size=20),
    next_attempt_at=st.none() | moments,
    created_at=moments,
    settled_at=st.none() | moments,
    kind=st.sampled_from(["transfer", "deposit", "refund", "payout", "capture"]),
    refund_of=st.none() | st.integers(1, 1000),
    refunded=st.integers(0, 10**6),
    refunds_claimed=st.integers(0, 10**6),
    hold_id=st.none() | st.integers(1, 1000),
    destination=st.none() | st.text(max_size=20),
)

# At any event of a transfer it had no refunds yet: they come only after it settled.
UNREFUNDED = {"refunded": 0, "refunds_claimed": 0}


@given(transfers)
def test_a_failed_event_shows_the_failure_whatever_happened_since(transfer: TransferRow) -> None:
    shown = transfer_at(transfer, EventType.TRANSFER_FAILED)
    assert (shown.status, shown.reason, shown.settled_at) == ("failed", SETTLEMENT_ERROR, None)
    # Nothing else of the transfer is touched: the rest never changes.
    assert shown._replace(status="", reason=None, settled_at=None) == transfer._replace(
        status="", reason=None, settled_at=None, **UNREFUNDED
    )


@given(transfers, st.sampled_from([t for t in EventType if t != EventType.TRANSFER_FAILED]))
def test_final_outcomes_show_the_transfer_as_it_is(
    transfer: TransferRow, event_type: EventType
) -> None:
    # settled and rejected are final: the row still says what the event said.
    assert transfer_at(transfer, event_type) == transfer._replace(**UNREFUNDED)


def test_event_types_are_listed_once_for_the_query_and_the_document() -> None:
    assert tuple(t.value for t in EventType) == EVENT_TYPES
    assert typing.get_args(openapi.Event.model_fields["type"].annotation) == EVENT_TYPES


def test_the_fan_out_names_only_final_statuses_and_the_received_type() -> None:
    assert "'pending'" not in TRANSFER_EVENTS
    for status in ("settled", "rejected", "failed"):
        assert f"'{status}'" in TRANSFER_EVENTS
    assert "'transfer.received'" in TRANSFER_EVENTS
    assert "interval '24 hours'" in TRANSFER_EVENTS
