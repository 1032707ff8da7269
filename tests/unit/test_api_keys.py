"""API keys without a service: secrets, digests, the shape check and the create schema."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import api_keys
from web.api_keys import ApiKeyCreate
from web.fields import validate
from web.problems import ApiError


def test_a_new_secret_is_rk_and_43_random_url_safe_characters() -> None:
    secrets = {api_keys.new_secret() for _ in range(1000)}
    assert len(secrets) == 1000
    for secret in secrets:
        assert secret.startswith("rk_")
        assert len(secret) == 3 + 43
        assert api_keys.is_well_formed(secret)


def test_the_digest_is_sha256_of_the_secret() -> None:
    secret = api_keys.new_secret()
    assert api_keys.digest_of(secret) == hashlib.sha256(secret.encode()).digest()
    assert len(api_keys.digest_of(secret)) == 32


@pytest.mark.parametrize(
    "token",
    ["", "rk_", "rk_" + "a" * 31, "rk_" + "a" * 129, "RK_" + "a" * 43, "sk_" + "a" * 43,
     "rk_" + "a" * 42 + "=", "rk_" + "a" * 42 + "\n", "rk_" + "é" * 43, " rk_" + "a" * 43],
)  # fmt: skip
def test_malformed_tokens_are_refused_without_a_query(token: str) -> None:
    assert not api_keys.is_well_formed(token)


@given(st.text(max_size=200))
def test_any_text_is_judged_without_an_error(token: str) -> None:
    well_formed = api_keys.is_well_formed(token)
    assert well_formed == (
        token.startswith("rk_")
        and 32 <= len(token) - 3 <= 128
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in token[3:])
    )


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        ("read", ("read",)),
        (" transfers ", ("transfers",)),
        ("transfers,read", ("read", "transfers")),
        (["transfers", "read", "transfers"], ("read", "transfers")),
    ],
)
def test_scopes_as_a_list_or_a_comma_separated_string(scopes: object, expected: tuple) -> None:
    assert validate(ApiKeyCreate, {"name": "k", "scopes": scopes}).scopes == expected


def test_both_scopes_by_default() -> None:
    assert validate(ApiKeyCreate, {"name": "k"}).scopes == ("read", "transfers")


@given(st.one_of(st.text(max_size=30), st.lists(st.text(max_size=12), max_size=4)))
def test_scopes_are_a_known_subset_or_invalid_request(scopes: object) -> None:
    codes: list[str] = []
    parsed: tuple[str, ...] = ()
    try:
        parsed = validate(ApiKeyCreate, {"name": "k", "scopes": scopes}).scopes
    except ApiError as error:
        codes.append(error.code)
    assert codes == ["invalid_request"] or (parsed and set(parsed) <= {"read", "transfers"})
