"""Hold events, the pure parts: what an event shows of its hold, and the hold's resource."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from common.events import hold_at
from common.holds import HoldRow
from common.models import EventType, HoldStatus

# hypothesis takes naive bounds and adds the zone itself.
moments = st.datetimes(
    min_value=datetime(2026, 1, 1),  # noqa: DTZ001
    max_value=datetime(2030, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
holds = st.builds(
    HoldRow,
    id=st.integers(1, 2**63 - 1),
    status=st.sampled_from([s.value for s in HoldStatus]),
    from_account_id=st.integers(1, 1000),
    to_account_id=st.integers(1, 1000),
    from_user_id=st.integers(1, 1000),
    to_user_id=st.integers(1, 1000),
    currency=st.sampled_from(["USD", "EUR", "CNY"]),
    amount=st.integers(1, 10**17),
    commission=st.integers(0, 10**15),
    captured_amount=st.none() | st.integers(1, 10**17),
    transfer_id=st.none() | st.integers(1, 1000),
    reason=st.sampled_from([None, "insufficient_funds"]),
    comment=st.text(max_size=20),
    requested_by=st.integers(1, 1000),
    idempotency_key=st.none(),
    request_fingerprint=st.none(),
    request_id=st.none(),
    void_requested_at=st.none() | moments,
    expires_at=moments,
    created_at=moments,
    updated_at=moments,
)
FINAL_EVENTS = [
    EventType.HOLD_REJECTED,
    EventType.HOLD_CAPTURED,
    EventType.HOLD_VOIDED,
    EventType.HOLD_EXPIRED,
]


@given(holds, moments)
def test_a_held_event_shows_the_hold_as_it_was_reserved(hold: HoldRow, at: datetime) -> None:
    shown = hold_at(hold, EventType.HOLD_HELD, at)
    assert shown.status == HoldStatus.HELD
    assert (shown.captured_amount, shown.transfer_id, shown.reason) == (None, None, None)
    assert shown.void_requested_at is None
    assert shown.updated_at == at
    # What never changes is shown as it is.
    unchanged = ("id", "amount", "commission", "from_account_id", "to_user_id", "expires_at")
    for name in unchanged:
        assert getattr(shown, name) == getattr(hold, name)


@given(holds, st.sampled_from(FINAL_EVENTS), moments)
def test_final_events_show_the_hold_as_it_is(
    hold: HoldRow, event_type: EventType, at: datetime
) -> None:
    # rejected, captured, voided and expired are final: the row still says so.
    assert hold_at(hold, event_type, at) == hold


def test_every_hold_event_type_is_covered() -> None:
    hold_types = {t for t in EventType if t.value.startswith("hold.")}
    assert hold_types == {EventType.HOLD_HELD, *FINAL_EVENTS}
