"""Request parsing: bodies in form, multipart or JSON, validated by pydantic schemas.

The schemas here are the one description of what each route accepts; the error
code of a rejected field follows docs/api.md (invalid_amount for amounts, and so on).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Literal, TypeVar

from flask import request
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

from common.limits import (
    BIGINT_MAX,
    COMMENT_MAX_LENGTH,
    FULL_NAME_MAX_LENGTH,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    IDEMPOTENCY_KEY_PATTERN,
    IDEMPOTENCY_KEY_RULE,
    PASSWORD_MAX_LENGTH,
    PASSWORD_MIN_LENGTH,
    USERNAME_MAX_LENGTH,
    USERNAME_PATTERN,
    WEBHOOK_URL_MAX_LENGTH,
    is_idempotency_key,
)
from common.models import EventType
from common.money import MAX_DECIMALS, MAX_INTEGER_DIGITS, InvalidAmount, canonical_amount
from common.webhooks import ALL_EVENTS, event_filter
from web.problems import ApiError

# Longer digit strings are refused before int() reads them (BIGINT_MAX has 19).
_ID_DIGITS = len(str(BIGINT_MAX))


def _id(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer id")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= _ID_DIGITS:
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= BIGINT_MAX:
        raise ValueError("must be an integer id")
    return value


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded at all.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def _amount(value: object) -> str:
    try:
        return canonical_amount(value)
    except InvalidAmount as error:
        raise ValueError(str(error)) from None


def _seconds(value: object) -> Decimal:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,6})?", value):
        raise ValueError("must be a number of seconds like 5 or 0.5")
    return Decimal(value)


# What the OpenAPI document says about ids and amounts. The validators above decide; these
# describe the same rules to clients (and to the contract fuzzer, which generates from them).
ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": BIGINT_MAX}
# A positive amount: a non-zero integer part with up to MAX_INTEGER_DIGITS digits (leading
# zeros aside) and up to MAX_DECIMALS fractional digits, or a zero integer part with a
# non-zero fraction of up to MAX_DECIMALS digits
# (spelt out without lookahead, which JSON Schema regexes may lack). How many fractional
# digits a currency takes (2 for the seeded ones) is checked later.
_NON_ZERO_FRACTION = "|".join(
    "0" * zeros
    + "[1-9]"
    + (f"[0-9]{{0,{MAX_DECIMALS - 1 - zeros}}}" if zeros < MAX_DECIMALS - 1 else "")
    for zeros in range(MAX_DECIMALS)
)
AMOUNT_PATTERN = (
    rf"^(?:0*[1-9][0-9]{{0,{MAX_INTEGER_DIGITS - 1}}}(?:\.[0-9]{{1,{MAX_DECIMALS}}})?"
    rf"|0+\.(?:{_NON_ZERO_FRACTION}))$"
)
AMOUNT_SCHEMA = {
    "description": (
        "A positive decimal amount in major units: ASCII digits and at most one '.', "
        f"at most {MAX_INTEGER_DIGITS} integer digits and at most as many fractional digits "
        "as the currency has "
        '("10", "10.5", "10.50"). A JSON number is read as its shortest decimal text.'
    ),
    "anyOf": [
        {"type": "string", "pattern": AMOUNT_PATTERN},
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 10**MAX_INTEGER_DIGITS},
    ],
    "examples": ["10.50"],
}

Id = Annotated[int, BeforeValidator(_id), WithJsonSchema(ID_SCHEMA)]
Text = Annotated[str, AfterValidator(_text)]
Amount = Annotated[str, BeforeValidator(_amount), WithJsonSchema(AMOUNT_SCHEMA)]


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class UserCreate(Schema):
    username: str = Field(min_length=1, max_length=USERNAME_MAX_LENGTH, pattern=USERNAME_PATTERN)
    password: Text = Field(min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)
    full_name: Text = Field("", max_length=FULL_NAME_MAX_LENGTH)


class TransferCreate(Schema):
    from_account: Id = Field(alias="from")
    to_account: Id = Field(alias="to")
    amount: Amount
    comment: Text = Field("", max_length=COMMENT_MAX_LENGTH)


IdempotencyKey = Annotated[
    str,
    Field(min_length=1, max_length=IDEMPOTENCY_KEY_MAX_LENGTH, pattern=IDEMPOTENCY_KEY_PATTERN),
]


class BatchItem(TransferCreate):
    idempotency_key: IdempotencyKey | None = None


MAX_BATCH_ITEMS = 1000


class BatchCreate(Schema):
    # Items stay raw here: each is validated on its own so one bad item fails alone.
    transfers: list[object] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class DepositCreate(Schema):
    amount: Amount


# --- refunds and payouts ----------------------------------------------------------------


class RefundCreate(Schema):
    # Absent (or null): all that is still refundable (docs/api.md "Refunds").
    amount: Amount | None = None
    comment: Text = Field("", max_length=COMMENT_MAX_LENGTH)


DESTINATION_MAX_LENGTH = 200


def _destination(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable characters only (no control characters)")
    return value


class PayoutCreate(Schema):
    from_account: Id = Field(alias="from")
    amount: Amount
    # Where the money goes outside Remit (a bank account reference, say): shown as given.
    destination: Annotated[str, AfterValidator(_destination)] = Field(
        min_length=1, max_length=DESTINATION_MAX_LENGTH, examples=["DE89 3704 0044 0532 0130 00"]
    )
    comment: Text = Field("", max_length=COMMENT_MAX_LENGTH)


def _count(value: object) -> int:
    # Query strings are text: plain ASCII digits only, no "+5", " 5" or "1_0".
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,4}", value):
        raise ValueError("must be a whole number")
    return int(value)


class PageQuery(Schema):
    sort: Literal["asc", "dsc"] = "asc"
    limit: Annotated[int, BeforeValidator(_count)] = Field(100, ge=1, le=500)
    cursor: str | None = Field(None, max_length=200)


MAX_WAIT_SECONDS = 30


class TransferWaitQuery(Schema):
    # Seconds to hold a pending transfer's answer (long poll): "5", "0.5"; at most 30.
    wait: Annotated[
        Decimal,
        BeforeValidator(_seconds),
        WithJsonSchema({"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS}),
    ] = Field(Decimal(0), ge=0, le=MAX_WAIT_SECONDS, json_schema_extra={"default": 0})


# RFC 3339's date-time, with its offset required: "Z" or +hh:mm/-hh:mm (either case of
# T and Z, as the RFC allows). Up to 9 fractional digits; we keep microseconds.
_INSTANT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_instant(value: object) -> datetime:
    """An RFC 3339 timestamp with a time zone, as an aware UTC datetime.

    Digits past the microsecond are cut, not rounded: the instant stays at or after
    every posting it counts, which are stored to the microsecond.
    """
    if not isinstance(value, str) or not (match := _INSTANT.fullmatch(value)):
        raise ValueError(
            "must be an RFC 3339 timestamp with a time zone, like 2026-11-27T10:15:30Z"
        )
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, zulu, sign, offset_hours, offset_minutes = match.groups()[6:]
    if second == 60:
        raise ValueError("leap seconds are not supported")
    if zulu or (int(offset_hours) == 0 and int(offset_minutes) == 0):
        zone = UTC
    elif int(offset_hours) > 23 or int(offset_minutes) > 59:
        raise ValueError("time zone offset out of range")
    else:
        offset = timedelta(hours=int(offset_hours), minutes=int(offset_minutes))
        zone = timezone(-offset if sign == "-" else offset)
    micros = int((fraction or "0").ljust(6, "0")[:6])
    try:
        local = datetime(year, month, day, hour, minute, second, micros, tzinfo=zone)
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError("not a valid date and time") from None


INSTANT_SCHEMA = {
    "type": "string",
    "format": "date-time",
    "description": "RFC 3339 with a time zone, not in the future (the database's clock)",
    "examples": ["2026-11-27T10:15:30Z"],
}


class AccountQuery(Schema):
    # The balance as it was at this instant (docs/api.md "Balance history").
    at: (
        Annotated[datetime, BeforeValidator(parse_instant), WithJsonSchema(INSTANT_SCHEMA)] | None
    ) = None


class TransferListQuery(PageQuery):
    payer: Id | None = Field(None, alias="from")
    payee: Id | None = Field(None, alias="to")
    status: Literal["pending", "settled", "rejected", "failed"] | None = None


EVENT_FILTER_SCHEMA = {
    "description": 'Event types to deliver, or ["*"] for all (a form takes them comma-separated).',
    "anyOf": [
        {
            "type": "array",
            "items": {"enum": [ALL_EVENTS, *(event_type.value for event_type in EventType)]},
            "minItems": 1,
            "uniqueItems": True,
        },
        {"type": "string", "examples": ["transfer.settled,transfer.received"]},
    ],
    "default": [ALL_EVENTS],
}


class WebhookCreate(Schema):
    # The rules beyond shape (scheme, host, addresses) are common.webhooks.check_url's.
    url: str = Field(
        min_length=1,
        max_length=WEBHOOK_URL_MAX_LENGTH,
        json_schema_extra={"format": "uri", "examples": ["https://example.com/remit-hooks"]},
    )
    events: Annotated[
        list[str], BeforeValidator(event_filter), WithJsonSchema(EVENT_FILTER_SCHEMA)
    ] = Field(default_factory=lambda: [ALL_EVENTS])


class DeliveryListQuery(Schema):
    # Newest first, always; pages continue with the cursor of the Link header.
    limit: Annotated[int, BeforeValidator(_count)] = Field(100, ge=1, le=500)
    cursor: str | None = Field(None, max_length=200)


EVENT_TYPES = tuple(event_type.value for event_type in EventType)


def _event_type(value: object) -> str:
    if value not in EVENT_TYPES:
        raise ValueError("must be one of " + ", ".join(EVENT_TYPES))
    return str(value)


class EventListQuery(Schema):
    # An event id from the feed (exclusive): the page starts after it.
    after: Id | None = None
    type: (
        Annotated[
            str,
            BeforeValidator(_event_type),
            WithJsonSchema({"type": "string", "enum": list(EVENT_TYPES)}),
        ]
        | None
    ) = None
    limit: Annotated[int, BeforeValidator(_count)] = Field(100, ge=1, le=500)


# A rejected field's code, where docs/api.md gives the field one of its own.
_FIELD_CODES = {
    "url": "invalid_url",
    "amount": "invalid_amount",
    "username": "invalid_username",
    "password": "invalid_password",
}

S = TypeVar("S", bound=Schema)


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON; as an amount they are an invalid amount.
    return name


def read_body() -> dict[str, object]:
    """The request's fields, whichever of the three accepted encodings carried them."""
    mimetype = request.mimetype
    if mimetype == "application/json" or mimetype.endswith("+json"):
        raw = request.get_data(cache=True)
        try:
            body = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise ApiError("invalid_request", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError("invalid_request", "the JSON body must be an object")
        return body
    if mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return dict(request.form.items())
    if not request.get_data(cache=True):
        return {}
    raise ApiError(
        "unsupported_media_type",
        "send application/json, application/x-www-form-urlencoded or multipart/form-data",
    )


def validate(schema: type[S], data: dict[str, object], *, query: bool = False) -> S:
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        code = "invalid_query" if query else _FIELD_CODES.get(field, "invalid_request")
        where = f"{field}: " if field else ""
        raise ApiError(code, where + first["msg"]) from None


def parse_body(schema: type[S]) -> S:
    return validate(schema, read_body())


def parse_query(schema: type[S]) -> S:
    return validate(schema, dict(request.args.items()), query=True)


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not is_idempotency_key(key):
        raise ApiError("invalid_request", f"Idempotency-Key must be {IDEMPOTENCY_KEY_RULE}")
    return key


# --- Holds (docs/api.md "Holds") ----------------------------------------------------------


def _whole_seconds(value: object) -> int:
    # An integer, or a form's digits; not 60.5, not true.
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,7}", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    raise ValueError("must be a whole number of seconds")


class HoldCreate(TransferCreate):
    expires_in: Annotated[
        int,
        BeforeValidator(_whole_seconds),
        WithJsonSchema({"type": "integer", "minimum": 60, "maximum": 604800, "default": 604800}),
    ] = Field(604800, ge=60, le=604800)


class HoldCapture(Schema):
    # All of the held amount unless less is asked for.
    amount: Amount | None = None


class HoldListQuery(PageQuery):
    status: Literal["pending", "held", "rejected", "captured", "voided", "expired"] | None = None
