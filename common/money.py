"""Money: integer minor units inside, exact decimal strings outside.

Amounts never pass through float. Parsing is strict on purpose: a payment API
that guesses what "1,000.5" or "1e3" meant moves the wrong amount of money.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, InvalidOperation

MAX_INTEGER_DIGITS = 15

_AMOUNT = re.compile(r"(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]*))?", re.ASCII)


class InvalidAmount(ValueError):
    """The text is not a positive amount the currency can hold."""


def parse_amount(value: object, decimals: int) -> int:
    """Parse a client's amount into positive minor units.

    Accepts ASCII digits with at most one '.' and at most `decimals` fractional
    digits ("10", "10.5", "10.50"); JSON numbers arrive as Decimal and are read
    as their shortest decimal text. Anything else raises InvalidAmount.
    """
    if isinstance(value, Decimal):
        text = _decimal_text(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value) if value >= 0 else "-"
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidAmount("amount must be a decimal string")
    match = _AMOUNT.fullmatch(text)
    if match is None:
        raise InvalidAmount("amount must be digits with at most one '.'")
    integer, fraction = match["int"], match["frac"] or ""
    if match["frac"] == "":
        raise InvalidAmount("amount must not end with '.'")
    if len(integer.lstrip("0")) > MAX_INTEGER_DIGITS:
        raise InvalidAmount(f"amount has more than {MAX_INTEGER_DIGITS} integer digits")
    if len(fraction) > decimals:
        raise InvalidAmount(f"amount has more than {decimals} fractional digits")
    minor: int = int(integer) * 10**decimals + int(fraction.ljust(decimals, "0") or "0")
    if minor <= 0:
        raise InvalidAmount("amount must be greater than zero")
    return minor


def _decimal_text(value: Decimal) -> str:
    """Shortest plain decimal text of a finite Decimal, or a marker that fails parsing."""
    if not value.is_finite() or value.is_signed():
        return "-"
    # Refuse absurd exponents before formatting: 1e999999999 would build a huge string.
    if value.adjusted() >= MAX_INTEGER_DIGITS or value.adjusted() < -64:
        return "-"
    # normalize() under the ambient context would round to its precision (28 digits):
    # 1.00000000000000000000000000001 would become 1. A context as precise as the
    # value itself only strips trailing zeros.
    exact = Context(prec=max(len(value.as_tuple().digits), 1))
    try:
        text = format(value.normalize(exact), "f")
    except InvalidOperation:
        return "-"
    return text


def amount_key(amount: str) -> str:
    """An amount as a request gave it, for telling requests apart: "10.5" and "10.50"
    are the same value; exact however many digits it has (see _decimal_text)."""
    value = Decimal(amount)
    exact = Context(prec=max(len(value.as_tuple().digits), 1))
    return format(value.normalize(exact), "f")


def format_amount(minor: int, decimals: int) -> str:
    """Minor units to a string with exactly the currency's decimals: 1050 -> "10.50"."""
    sign = "-" if minor < 0 else ""
    units, cents = divmod(abs(minor), 10**decimals)
    if decimals == 0:
        return f"{sign}{units}"
    return f"{sign}{units}.{cents:0{decimals}d}"


def commission_for(amount_minor: int, rate: Decimal) -> int:
    """ceil(amount x rate) in minor units, exactly.

    The rate is a Decimal like Decimal("0.01"); ceil on exact rationals avoids any
    rounding of the product before the ceiling is taken.
    """
    if amount_minor <= 0:
        raise ValueError("amount must be positive")
    if rate.is_signed() or not rate.is_finite():
        raise ValueError("rate must be a finite non-negative decimal")
    numerator, denominator = rate.as_integer_ratio()
    return -((-amount_minor * numerator) // denominator)


# The most fractional digits any currency may have (currencies.decimals CHECK).
MAX_DECIMALS = 6


def canonical_amount(value: object) -> str:
    """Check an amount's shape before its currency is known; return it as decimal text.

    The currency's own number of decimals is checked later by parse_amount.
    """
    parse_amount(value, MAX_DECIMALS)
    if isinstance(value, Decimal):
        return _decimal_text(value)
    return str(value)
