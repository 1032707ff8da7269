"""Money arithmetic: strict parsing, exact formatting, commission = ceil(amount x rate).

Pure functions, so hypothesis drives them hard; every oracle here is computed
independently (fractions.Fraction, hand-written shape checks), never by calling
the code under test.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from common.money import (
    MAX_DECIMALS,
    MAX_INTEGER_DIGITS,
    InvalidAmount,
    amount_key,
    commission_for,
    format_amount,
    parse_amount,
)
from tests.properties import examples

FAST = examples(300)
FUZZ = examples(600)

decimals_st = st.integers(min_value=0, max_value=MAX_DECIMALS)


@st.composite
def minor_and_decimals(draw: st.DrawFn) -> tuple[int, int]:
    """Any positive minor amount whose integer part has at most 15 digits."""
    decimals = draw(decimals_st)
    top = 10 ** (MAX_INTEGER_DIGITS + decimals) - 1
    minor = draw(
        st.one_of(
            st.integers(min_value=1, max_value=top),
            st.sampled_from([1, 9, 10, 99, 100, 101, top, top - 1, 10**decimals]),
        )
    )
    return minor, decimals


def _exact_value(text: str) -> Fraction:
    """The value of a well-formed ASCII decimal text, computed without the code under test."""
    integer, _, fraction = text.partition(".")
    return Fraction(int(integer + fraction), 10 ** len(fraction))


# --- round trip ---------------------------------------------------------------------------


@FAST
@given(minor_and_decimals())
def test_format_then_parse_is_identity(case: tuple[int, int]) -> None:
    minor, decimals = case
    text = format_amount(minor, decimals)
    # Output always has exactly the currency's decimals.
    if decimals == 0:
        assert re.fullmatch(r"[1-9][0-9]*", text), text
    else:
        assert re.fullmatch(rf"(0|[1-9][0-9]*)\.[0-9]{{{decimals}}}", text), text
    assert _exact_value(text) == Fraction(minor, 10**decimals)
    assert parse_amount(text, decimals) == minor
    # The same amount as a JSON number (Decimal) and with trailing zeros dropped.
    assert parse_amount(Decimal(text), decimals) == minor
    if "." in text:
        assert parse_amount(text.rstrip("0").rstrip("."), decimals) == minor


@FAST
@given(minor_and_decimals(), st.integers(min_value=0, max_value=MAX_DECIMALS))
def test_parse_then_format_pads_to_the_currency_decimals(
    case: tuple[int, int], currency_decimals: int
) -> None:
    minor, written_decimals = case
    assume(written_decimals <= currency_decimals)
    text = format_amount(minor, written_decimals)
    parsed = parse_amount(text, currency_decimals)
    assert parsed == minor * 10 ** (currency_decimals - written_decimals)
    assert Fraction(parsed, 10**currency_decimals) == _exact_value(text)
    formatted = format_amount(parsed, currency_decimals)
    assert _exact_value(formatted) == _exact_value(text)


@pytest.mark.parametrize(
    ("text", "decimals", "minor"),
    [
        ("10", 2, 1000),
        ("10.5", 2, 1050),
        ("10.50", 2, 1050),
        ("0.01", 2, 1),
        ("1", 0, 1),
        ("0.000001", 6, 1),
        ("999999999999999", 0, 999_999_999_999_999),
        ("999999999999999.999999", 6, 999_999_999_999_999_999_999),
    ],
)
def test_parse_examples(text: str, decimals: int, minor: int) -> None:
    assert parse_amount(text, decimals) == minor


@pytest.mark.parametrize(
    ("minor", "decimals", "text"),
    [
        (1050, 2, "10.50"),
        (0, 2, "0.00"),
        (1, 2, "0.01"),
        (-1010, 2, "-10.10"),
        (7, 0, "7"),
        (1, 6, "0.000001"),
        (-5, 3, "-0.005"),
    ],
)
def test_format_examples(minor: int, decimals: int, text: str) -> None:
    assert format_amount(minor, decimals) == text


def test_int_input_is_whole_units() -> None:
    assert parse_amount(10, 2) == 1000
    assert parse_amount(10**MAX_INTEGER_DIGITS - 1, 0) == 10**MAX_INTEGER_DIGITS - 1


# --- strict rejection ---------------------------------------------------------------------

MALFORMED = [
    # empty and bare dots
    "",
    ".",
    "..",
    ".5",
    "5.",
    "1.2.3",
    # signs
    "+1",
    "-1",
    "+1.00",
    "-0.01",
    "1-",
    "1+",
    "\u22121",  # U+2212 minus sign
    # exponents
    "1e2",
    "1E2",
    "1e-2",
    "1E+2",
    "1.5e1",
    "e2",
    # spaces and other whitespace
    " 1",
    "1 ",
    "1 000",
    "\t1",
    "1\n",
    "\n1",
    "1\r\n",
    "\u00a01",  # no-break space
    "1\u202f000",  # narrow no-break space
    "1\u200b",  # zero-width space
    # separators
    "1,000",
    "1,000.00",
    "1_000",
    "1'000",
    "1,5",
    "1.000,00",
    "1/2",
    # non-ASCII digits
    "\uff11\uff10",  # full-width
    "1\uff10",  # ASCII one, full-width zero
    "\u0661\u0660",  # Arabic-Indic
    "\u06f1\u06f0",  # Extended Arabic-Indic (Persian)
    "\u0967\u0966",  # Devanagari
    "\u09e7\u09e6",  # Bengali
    "\u0e51\u0e50",  # Thai
    "10.\u0665",  # Arabic-Indic five in the fraction
    "\u00b2",  # superscript two
    "\u2460",  # circled one
    "\U0001d7cf\U0001d7ce",  # mathematical bold digits
    # words and specials
    "NaN",
    "nan",
    "sNaN",
    "Infinity",
    "-Infinity",
    "inf",
    "Inf",
    "0x10",
    "0b1",
    "0o7",
    "ten",
    "$10",
    "10$",
    "10 USD",
    "10%",
    "None",
    "null",
    "true",
]


@pytest.mark.parametrize("text", MALFORMED)
@pytest.mark.parametrize("decimals", [0, 2, 6])
def test_malformed_text_is_rejected(text: str, decimals: int) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(text, decimals)


@pytest.mark.parametrize("text", ["0", "00", "0.0", "0.00", "000.000000", "0.000000"])
def test_zero_is_rejected(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(text, 6)


@pytest.mark.parametrize(
    "value",
    [
        Decimal(0),
        Decimal("0.00"),
        Decimal("-0"),
        Decimal("-0.00"),
        Decimal("0E-10"),
        Decimal("0E+5"),
        0,
    ],
)
def test_zero_is_rejected_in_every_type(value: object) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(value, 2)


@FAST
@given(st.integers(min_value=0, max_value=MAX_DECIMALS), st.data())
def test_more_than_15_integer_digits_is_rejected(decimals: int, data: st.DataObject) -> None:
    digits = data.draw(st.integers(min_value=MAX_INTEGER_DIGITS + 1, max_value=40))
    integer = data.draw(st.integers(min_value=10 ** (digits - 1), max_value=10**digits - 1))
    fraction = data.draw(st.text(alphabet="0123456789", max_size=decimals))
    text = f"{integer}.{fraction}" if fraction else str(integer)
    with pytest.raises(InvalidAmount):
        parse_amount(text, decimals)
    with pytest.raises(InvalidAmount):
        parse_amount(integer, decimals)
    with pytest.raises(InvalidAmount):
        parse_amount(Decimal(text), decimals)


def test_fifteen_integer_digits_is_the_limit() -> None:
    assert parse_amount("9" * 15, 2) == int("9" * 15) * 100
    assert parse_amount("9" * 15 + ".99", 2) == int("9" * 17)
    for text in ("1" + "0" * 15, "9" * 16, "1" + "0" * 15 + ".00"):
        with pytest.raises(InvalidAmount):
            parse_amount(text, 2)


@FAST
@given(st.integers(min_value=0, max_value=MAX_DECIMALS), st.data())
def test_too_many_decimals_is_rejected(decimals: int, data: st.DataObject) -> None:
    integer = data.draw(st.integers(min_value=0, max_value=10**MAX_INTEGER_DIGITS - 1))
    extra = data.draw(st.integers(min_value=1, max_value=10))
    fraction = data.draw(st.text(alphabet="0123456789", min_size=decimals, max_size=decimals))
    # The extra digits end in a non-zero digit: the value really has more decimals.
    tail = data.draw(st.text(alphabet="0123456789", min_size=extra - 1, max_size=extra - 1))
    last = data.draw(st.sampled_from("123456789"))
    text = f"{integer}.{fraction}{tail}{last}"
    with pytest.raises(InvalidAmount):
        parse_amount(text, decimals)
    with pytest.raises(InvalidAmount):
        parse_amount(Decimal(text), decimals)


def test_trailing_zeros_beyond_the_decimals_are_rejected_in_text() -> None:
    # Text is read as written: "10.500" has three fractional digits.
    with pytest.raises(InvalidAmount):
        parse_amount("10.500", 2)
    with pytest.raises(InvalidAmount):
        parse_amount("1.0", 0)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        1.0,
        10.5,
        0.1,
        float("nan"),
        float("inf"),
        float("-inf"),
        None,
        b"10",
        bytearray(b"10"),
        [10],
        ("10",),
        {"amount": "10"},
        Fraction(21, 2),
        complex(1, 0),
        -1,
        -(10**20),
        10**MAX_INTEGER_DIGITS,
    ],
)
def test_non_amount_types_are_rejected(value: object) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(value, 2)


def test_invalid_amount_is_a_value_error() -> None:
    # Callers that only know ValueError still catch it.
    assert issubclass(InvalidAmount, ValueError)


@FAST
@given(minor_and_decimals(), st.data())
def test_non_ascii_digit_anywhere_is_rejected(case: tuple[int, int], data: st.DataObject) -> None:
    minor, decimals = case
    text = format_amount(minor, decimals)
    position = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    assume(text[position] != ".")
    # Any Unicode decimal digit that is not ASCII (full-width, Arabic-Indic, ...).
    foreign = data.draw(st.characters(categories=["Nd"]).filter(lambda c: not ("0" <= c <= "9")))
    mutated = text[:position] + foreign + text[position + 1 :]
    with pytest.raises(InvalidAmount):
        parse_amount(mutated, decimals)


# Interesting characters: digits, the one allowed separator, and the usual suspects.
FUZZ_ALPHABET = "0123456789" * 3 + ".+-eE ,_'\t\n\u00a0\uff11\u0663\u06f4\u096fNnaIifxX"

WELL_FORMED = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)


def _should_accept(text: str, decimals: int) -> int | None:
    """An independent statement of the contract: the minor units, or None for invalid."""
    match = WELL_FORMED.fullmatch(text)
    if match is None:
        return None
    fraction = match.group(2) or ""
    if len(fraction) > decimals:
        return None
    value = _exact_value(text) * 10**decimals
    assert value.denominator == 1
    if value <= 0 or value >= 10**MAX_INTEGER_DIGITS * 10**decimals:
        return None
    return value.numerator


@FUZZ
@given(st.text(alphabet=FUZZ_ALPHABET, max_size=24), decimals_st)
@example("1.", 2)
@example("1.5", 0)
@example("00001.50", 2)
@example("1e3", 2)
def test_fuzzed_text_is_accepted_exactly_when_well_formed(text: str, decimals: int) -> None:
    expected = _should_accept(text, decimals)
    match = WELL_FORMED.fullmatch(text)
    try:
        got = parse_amount(text, decimals)
    except InvalidAmount:
        got = None
    # Leading zeros beyond 15 characters ("0000000000000001") are deliberately not
    # pinned down here: only the digits that carry value are limited.
    if match is not None and len(match.group(1)) > MAX_INTEGER_DIGITS:
        assert got in (None, expected)
        return
    assert got == expected, (text, decimals)


# --- Decimal inputs (JSON numbers) --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decimals", "minor"),
    [
        (Decimal("10.500"), 2, 1050),
        (Decimal("10.5"), 2, 1050),
        (Decimal("10"), 2, 1000),
        (Decimal("1E+2"), 0, 100),
        (Decimal("1E+2"), 2, 10000),
        (Decimal("1.5E+1"), 2, 1500),
        (Decimal("12.5E-1"), 2, 125),
        (Decimal("0.01"), 2, 1),
        (Decimal("1E-2"), 2, 1),
        (Decimal("100E-2"), 0, 1),
        (Decimal("1.000000000000000000000000000000000"), 2, 100),
        (Decimal("999999999999999"), 0, 999_999_999_999_999),
        (Decimal("9.99999999999999E+14"), 0, 999_999_999_999_999),
    ],
)
def test_decimal_is_read_as_its_shortest_text(value: Decimal, decimals: int, minor: int) -> None:
    assert parse_amount(value, decimals) == minor


@pytest.mark.parametrize(
    ("value", "decimals"),
    [
        (Decimal("NaN"), 2),
        (Decimal("sNaN"), 2),
        (Decimal("-NaN"), 2),
        (Decimal("Infinity"), 2),
        (Decimal("-Infinity"), 2),
        (Decimal("-1"), 2),
        (Decimal("-0.01"), 2),
        (Decimal("1E+15"), 2),
        (Decimal("1E+999999999"), 2),
        (Decimal("1E-999999999"), 6),
        (Decimal("10.505"), 2),
        (Decimal("1E-3"), 2),
        (Decimal("1.5"), 0),
        # More significant digits than the default decimal context holds (28): must not
        # be rounded to 1.00 on the way in.
        (Decimal("1.00000000000000000000000000001"), 2),
        (Decimal("100.0000000000000000000000000001"), 6),
        (Decimal("999999999999999.9999999999999999999"), 6),
    ],
)
def test_bad_decimal_is_rejected(value: Decimal, decimals: int) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(value, decimals)


@FAST
@given(minor_and_decimals(), st.integers(min_value=-20, max_value=20))
def test_decimal_in_any_exponent_form_reads_its_exact_value(
    case: tuple[int, int], shift: int
) -> None:
    minor, decimals = case
    # The same value written with a different exponent, and with extra trailing zeros.
    value = Decimal(minor).scaleb(-decimals)
    scaled = Decimal((0, Decimal(minor * 10**20).as_tuple().digits, -decimals - 20))
    assert scaled == value
    assert parse_amount(value, decimals) == minor
    assert parse_amount(scaled, decimals) == minor
    rewritten = Decimal(f"{minor}E{-decimals}")
    assert parse_amount(rewritten, decimals) == minor
    # A value shifted to need more decimals than the currency has is refused.
    if shift > 0 and minor % 10 != 0:
        with pytest.raises(InvalidAmount):
            parse_amount(value.scaleb(-shift), decimals)


@FAST
@given(minor_and_decimals(), st.integers(min_value=1, max_value=8))
def test_decimal_parsing_ignores_the_ambient_context(case: tuple[int, int], prec: int) -> None:
    minor, decimals = case
    value = Decimal(minor).scaleb(-decimals)
    with localcontext() as context:
        context.prec = prec
        assert parse_amount(value, decimals) == minor


# --- commission ---------------------------------------------------------------------------


def _ceil_exact(amount: int, rate: Decimal) -> int:
    product = Fraction(amount) * Fraction(str(rate))
    return math.ceil(product)


rates_st = st.one_of(
    st.sampled_from([Decimal("0.01"), Decimal("0.02"), Decimal("0.03"), Decimal("0")]),
    # NUMERIC(10, 6) in [0, 1): what the currencies table can hold.
    st.integers(min_value=0, max_value=999_999).map(lambda n: Decimal(n).scaleb(-6)),
    st.decimals(min_value=0, max_value=Decimal("0.999999"), places=6),
)
amounts_st = st.one_of(
    st.integers(min_value=1, max_value=10_000),
    st.integers(min_value=1, max_value=10**21),
)


@examples(1000)
@given(amounts_st, rates_st)
@example(1, Decimal("0.01"))
@example(100, Decimal("0.01"))
@example(101, Decimal("0.01"))
@example(99, Decimal("0.01"))
@example(10**21, Decimal("0.999999"))
def test_commission_is_exact_ceiling(amount: int, rate: Decimal) -> None:
    commission = commission_for(amount, rate)
    assert isinstance(commission, int)
    assert not isinstance(commission, bool)
    assert commission == _ceil_exact(amount, rate)
    # The defining property of a ceiling, stated without math.ceil.
    exact = Fraction(amount) * Fraction(str(rate))
    assert commission - 1 < exact <= commission


@pytest.mark.parametrize(
    ("amount", "rate", "commission"),
    [
        # 1 minor unit at 1 % rounds up to a whole minor unit.
        (1, "0.01", 1),
        (1, "0.03", 1),
        # Exact multiples do not round up.
        (100, "0.01", 1),
        (1000, "0.01", 10),
        (200, "0.02", 4),
        (100, "0.03", 3),
        (3334, "0.03", 101),
        (3333, "0.03", 100),
        # Just above a multiple rounds up.
        (101, "0.01", 2),
        (1001, "0.01", 11),
        (10_01, "0.03", 31),  # 10.01 EUR at 3 % = 0.3003 -> 0.31
        (50, "0.02", 1),
        (51, "0.02", 2),
        # Zero rate, and trailing zeros in the rate change nothing.
        (12345, "0", 0),
        (100, "0.010000", 1),
        (101, "0.010000", 2),
        (10**21, "0.01", 10**19),
        (10**21 + 1, "0.01", 10**19 + 1),
    ],
)
def test_commission_examples(amount: int, rate: str, commission: int) -> None:
    assert commission_for(amount, Decimal(rate)) == commission


@pytest.mark.parametrize("amount", [0, -1, -100])
def test_commission_needs_a_positive_amount(amount: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        commission_for(amount, Decimal("0.01"))


@pytest.mark.parametrize("rate", ["-0.01", "NaN", "Infinity", "-Infinity", "sNaN"])
def test_commission_refuses_bad_rates(rate: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        commission_for(100, Decimal(rate))


@FAST
@given(st.integers(min_value=1, max_value=10**15), rates_st)
def test_commission_is_monotonic_and_never_exceeds_the_amount(amount: int, rate: Decimal) -> None:
    commission = commission_for(amount, rate)
    assert commission_for(amount + 1, rate) >= commission
    # rate < 1, so the commission never exceeds the amount; it is 0 only at rate 0.
    assert 0 <= commission <= amount
    assert (commission == 0) == (rate == 0)


def test_an_amount_key_is_the_exact_value_as_given() -> None:
    # One request whatever its trailing zeros; two, however far apart the digits are
    # (the ambient 28-digit context would have rounded the second to 1).
    assert amount_key("10.5") == amount_key("10.50") == "10.5"
    assert amount_key("1.00000000000000000000000000001") != amount_key("1")
