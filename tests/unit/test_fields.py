"""Request fields parsed without a request: ids, amounts, text, paging and waits, and
the error code each refusal maps to (the HTTP tests check the same through the API)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from web.fields import PageQuery, TransferCreate, TransferWaitQuery, UserCreate, validate
from web.problems import ApiError


def test_a_transfer_reads_ids_and_a_canonical_amount_from_text() -> None:
    transfer = validate(TransferCreate, {"from": "1", "to": "9223372036854775807", "amount": "5"})
    assert (transfer.from_account, transfer.to_account) == (1, 2**63 - 1)
    assert transfer.amount == "5"
    assert transfer.comment == ""


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"from": "9223372036854775808", "to": 2, "amount": "1"}, "invalid_request"),
        ({"from": True, "to": 2, "amount": "1"}, "invalid_request"),
        ({"from": "+1", "to": 2, "amount": "1"}, "invalid_request"),
        ({"from": 1, "to": 2, "amount": "0"}, "invalid_amount"),
        ({"from": 1, "to": 2, "amount": "1e3"}, "invalid_amount"),
        ({"from": 1, "to": 2, "amount": "1", "comment": "nul\x00"}, "invalid_request"),
        ({"to": 2, "amount": "1"}, "invalid_request"),
    ],
    ids=["id beyond bigint", "bool id", "signed id", "zero", "exponent", "nul", "missing"],
)
def test_a_bad_transfer_field_is_refused_with_its_code(fields: dict, code: str) -> None:
    with pytest.raises(ApiError) as raised:
        validate(TransferCreate, fields)
    assert raised.value.code == code


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"username": "", "password": "long enough"}, "invalid_username"),
        ({"username": "spa ce", "password": "long enough"}, "invalid_username"),
        ({"username": "x" * 65, "password": "long enough"}, "invalid_username"),
        ({"username": "ok", "password": "short"}, "invalid_password"),
    ],
)
def test_a_bad_registration_names_its_field(fields: dict, code: str) -> None:
    with pytest.raises(ApiError) as raised:
        validate(UserCreate, fields)
    assert raised.value.code == code


def test_paging_defaults_and_limits() -> None:
    page = validate(PageQuery, {}, query=True)
    assert (page.sort, page.limit, page.cursor) == ("asc", 100, None)
    assert validate(PageQuery, {"limit": "500"}, query=True).limit == 500
    for limit in ("0", "501", "+5", " 5", "1_0"):
        with pytest.raises(ApiError) as raised:
            validate(PageQuery, {"limit": limit}, query=True)
        assert raised.value.code == "invalid_query"


def test_a_wait_is_at_most_30_seconds_in_plain_digits() -> None:
    assert validate(TransferWaitQuery, {"wait": "0.5"}, query=True).wait == Decimal("0.5")
    assert validate(TransferWaitQuery, {}, query=True).wait == 0
    for wait in ("31", "-1", "1e1", "nan", "5.", "0.0000001"):
        with pytest.raises(ApiError):
            validate(TransferWaitQuery, {"wait": wait}, query=True)
