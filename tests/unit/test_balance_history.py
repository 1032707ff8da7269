"""The `at` of GET /accounts/{id}?at= parsed without a request: what RFC 3339 forms are
read, how they are normalised, and that everything else is invalid_query."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from common.render import timestamp
from tests.properties import examples
from web.fields import AccountQuery, parse_instant, validate
from web.problems import ApiError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T10:15:30Z", "2026-11-27T10:15:30.000000Z"),
        ("2026-11-27t10:15:30z", "2026-11-27T10:15:30.000000Z"),
        ("2026-11-27T10:15:30.5Z", "2026-11-27T10:15:30.500000Z"),
        ("2026-11-27T10:15:30.123456Z", "2026-11-27T10:15:30.123456Z"),
        # Past the microsecond digits are cut, never rounded up past a posting.
        ("2026-11-27T10:15:30.123456999Z", "2026-11-27T10:15:30.123456Z"),
        ("2026-11-27T10:15:30+05:30", "2026-11-27T04:45:30.000000Z"),
        ("2026-11-27T00:15:30-01:00", "2026-11-27T01:15:30.000000Z"),
        ("2026-11-27T10:15:30-00:00", "2026-11-27T10:15:30.000000Z"),
        ("2024-02-29T23:59:59.999999+00:00", "2024-02-29T23:59:59.999999Z"),
    ],
)
def test_an_instant_is_read_and_normalised_to_utc_microseconds(text: str, expected: str) -> None:
    assert timestamp(parse_instant(text)) == expected
    assert timestamp(validate(AccountQuery, {"at": text}, query=True).at) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "now",
        "2026-11-27",
        "2026-11-27T10:15:30",  # no time zone
        "2026-11-27 10:15:30Z",  # RFC 3339 allows a space only in prose; we want the T
        "2026-11-27T10:15Z",
        "2026-11-27T10:15:30.Z",
        "2026-11-27T10:15:30.1234567890Z",
        "2026-11-27T10:15:30+0530",
        "2026-11-27T10:15:30+05",
        "2026-11-27T10:15:30+24:00",
        "2026-11-27T10:15:30+05:60",
        "2026-13-01T00:00:00Z",
        "2026-02-29T00:00:00Z",
        "2026-11-27T24:00:00Z",
        "2026-11-27T23:59:60Z",  # a leap second: RFC 3339 has them, our clocks do not
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "+2026-11-27T10:15:30Z",
        "\uff12\uff10\uff12\uff16-11-27T10:15:30Z",  # fullwidth digits
        "2026-11-27T10:15:30Z\n",
        "1764238530",
    ],
)
def test_anything_else_is_invalid_query(text: str) -> None:
    with pytest.raises(ApiError) as raised:
        validate(AccountQuery, {"at": text}, query=True)
    assert raised.value.code == "invalid_query"
    assert raised.value.detail.startswith("at: ")


def test_without_at_there_is_no_instant() -> None:
    assert validate(AccountQuery, {}, query=True).at is None


_OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))


@examples(200)
@given(
    # Naive bounds: st.datetimes() takes no aware ones; the zone is drawn separately.
    moment=st.datetimes(
        min_value=datetime(2, 1, 1),  # noqa: DTZ001
        max_value=datetime(9998, 12, 31),  # noqa: DTZ001
    ),
    zone=_OFFSETS,
)
def test_any_instant_round_trips_through_its_rfc_3339_text(
    moment: datetime, zone: timezone
) -> None:
    # Any offset RFC 3339 can write (whole minutes, under a day), any microsecond.
    aware = moment.replace(tzinfo=zone)
    text = aware.isoformat(timespec="microseconds")
    note(text)
    parsed = parse_instant(text)
    assert parsed == aware
    assert parsed.tzinfo is UTC
    assert parse_instant(timestamp(parsed)) == parsed
