"""Bad input of every shape is a 4xx application/problem+json, never a 5xx (docs/api.md)."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import PROBLEM_MEMBERS, SUPERUSER, Api, Member, assert_problem
from web.problems import PROBLEMS

MIB = 1024 * 1024
BIGINT_MAX = 2**63 - 1


def assert_client_error(response) -> dict:
    """Any 4xx, as a well-formed problem whose code docs/api.md lists with that status."""
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body.keys() >= PROBLEM_MEMBERS, body
    assert body["status"] == response.status_code
    assert PROBLEMS[body["code"]][0] == response.status_code
    return body


@pytest.fixture(scope="module")
def people(app, settlement_worker) -> tuple[Member, Member]:
    """A payer without money (nothing accepted here can move any) and a payee."""
    api = Api(app.test_client())
    return api.register("payer"), api.register("payee")


def send_transfer(client, payer: Member, payee: Member, overrides: dict, *, as_json: bool):
    fields = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1"}
    fields.update(overrides)
    path = f"/users/{payer.id}/transfers"
    if as_json:
        return client.post(path, json=fields, headers=payer.auth)
    return client.post(path, data=fields, headers=payer.auth)


def send_raw(client, path: str, raw: bytes | str, content_type: str, headers=None):
    return client.post(path, data=raw, content_type=content_type, headers=headers or {})


# --- amounts -------------------------------------------------------------------------------

BAD_AMOUNT_TEXT = [
    "",
    " 1",
    "1 ",
    "\t1",
    "10.5\n",
    "1,000",
    "1_000",
    "1'000",
    "1e3",
    "1E3",
    "-1",
    "+1",
    "0",
    "0.00",
    "00.00",
    "-0",
    "10.123",
    "0.001",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "inf",
    "\uff11\uff12",  # full-width digits
    "\u0661\u0662",  # Arabic-Indic digits
    "\u00bd",
    "1.2.3",
    "10.",
    ".5",
    ".",
    "0x10",
    "1/2",
    "$1",
    "1" * 16,
    "9" * 16 + ".00",
    "9" * 5000,
    "0" * 5000 + "1",
    "1\x00",
    "ten",
]


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
@pytest.mark.parametrize("amount", BAD_AMOUNT_TEXT, ids=repr)
def test_bad_amount_text(client, people, amount: str, as_json: bool) -> None:
    payer, payee = people
    response = send_transfer(client, payer, payee, {"amount": amount}, as_json=as_json)
    assert_problem(response, 400, "invalid_amount")


BAD_AMOUNT_JSON = [
    "1e400",
    "-1e400",
    "1e-400",
    "1E+16",
    "10.123",
    "0",
    "0.0",
    "-0",
    "-0.0",
    "-1",
    "-10.5",
    "10000000000000000",
    "1" + "0" * 5000,
    "true",
    "false",
    "null",
    "[]",
    "[1]",
    "{}",
    '{"amount": 1}',
    "NaN",
    "Infinity",
    "-Infinity",
]


@pytest.mark.parametrize("raw", BAD_AMOUNT_JSON)
def test_bad_amount_json_value(client, people, raw: str) -> None:
    payer, payee = people
    body = f'{{"from": {payer.accounts["USD"]}, "to": {payee.accounts["USD"]}, "amount": {raw}}}'
    response = send_raw(
        client, f"/users/{payer.id}/transfers", body, "application/json", payer.auth
    )
    # A number too long for Python's int() is not valid JSON to the parser: that is
    # invalid_request, the body never got as far as its amount.
    code = "invalid_request" if len(raw) > 4300 else "invalid_amount"
    assert_problem(response, 400, code)


@pytest.mark.parametrize(("raw", "shown"), [("10.5", "10.50"), ("7", "7.00"), ("1.10", "1.10")])
def test_json_number_amount(client, people, raw: str, shown: str) -> None:
    payer, payee = people
    body = f'{{"from": {payer.accounts["USD"]}, "to": {payee.accounts["USD"]}, "amount": {raw}}}'
    response = send_raw(
        client, f"/users/{payer.id}/transfers", body, "application/json", payer.auth
    )
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["amount"] == shown


@pytest.mark.parametrize(
    "amount", ["", "0", "1e3", "NaN", "10.123", "-5", "1" * 16, "1000000000000000", "0.001"]
)
def test_bad_deposit_amount(client, people, amount: str) -> None:
    payer, _ = people
    response = client.post(
        f"/accounts/{payer.accounts['USD']}/deposits",
        json={"amount": amount},
        headers=SUPERUSER.auth,
    )
    assert_problem(response, 400, "invalid_amount")


def test_largest_deposit_is_accepted(api) -> None:
    member = api.register()
    response = api.client.post(
        f"/accounts/{member.accounts['USD']}/deposits",
        data={"amount": "999999999999999.99"},
        headers=SUPERUSER.auth,
    )
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["amount"] == "999999999999999.99"


def test_batch_item_limits_fail_each_item_alone(client, people) -> None:
    payer, payee = people
    good = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1"}
    key = secrets.token_hex(128)[:255]
    items = [
        {**good, "comment": "x" * 256},
        {**good, "idempotency_key": "k" * 256},
        {**good, "idempotency_key": ""},
        {**good, "amount": "1" * 16},
        {**good, "amount": "0.001"},
        {**good, "comment": "x" * 255, "idempotency_key": key},
    ]
    response = client.post(
        f"/users/{payer.id}/transfers/batch", json={"transfers": items}, headers=payer.auth
    )
    assert response.status_code == 202, response.get_json()
    results = response.get_json()["results"]
    assert [r["status"] for r in results] == [400, 400, 400, 400, 400, 202]
    assert [r["error"]["code"] for r in results[:5]] == [
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_amount",
        "invalid_amount",
    ]


# --- ids -----------------------------------------------------------------------------------

BAD_ID_FORM = [
    "",
    "abc",
    "-1",
    "1.5",
    " 1",
    "1 ",
    "+1",
    "1e3",
    "0x1",
    "\uff11",
    "9" * 20,
    "9" * 5000,
]
BAD_ID_JSON: list[Any] = [
    "abc",
    "",
    "-1",
    " 1",
    -1,
    1.5,
    True,
    False,
    None,
    [],
    [1],
    {},
    {"id": 1},
    BIGINT_MAX + 1,
    99999999999999999999,
    "99999999999999999999",
]


@pytest.mark.parametrize("field", ["from", "to"])
@pytest.mark.parametrize("value", BAD_ID_FORM, ids=repr)
def test_bad_id_in_a_form(client, people, field: str, value: str) -> None:
    payer, payee = people
    response = send_transfer(client, payer, payee, {field: value}, as_json=False)
    assert_problem(response, 400, "invalid_request")


@pytest.mark.parametrize("field", ["from", "to"])
@pytest.mark.parametrize("value", BAD_ID_JSON, ids=repr)
def test_bad_id_in_json(client, people, field: str, value: Any) -> None:
    payer, payee = people
    response = send_transfer(client, payer, payee, {field: value}, as_json=True)
    assert_problem(response, 400, "invalid_request")


@pytest.mark.parametrize("value", [0, BIGINT_MAX, str(BIGINT_MAX)])
def test_ids_in_range_that_name_no_account(client, people, value: Any) -> None:
    payer, payee = people
    response = send_transfer(client, payer, payee, {"to": value}, as_json=True)
    assert_problem(response, 404, "account_not_found")


# --- text fields -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
@pytest.mark.parametrize(
    ("field", "code"),
    [
        ("username", "invalid_username"),
        ("password", "invalid_password"),
        ("full_name", "invalid_request"),
    ],
)
def test_nul_in_registration_fields(client, field: str, code: str, as_json: bool) -> None:
    fields = {"username": "nul_tester", "password": "long enough", field: "bad\x00value!"}
    response = client.post("/users", json=fields) if as_json else client.post("/users", data=fields)
    assert_problem(response, 400, code)


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_nul_in_comment(client, people, as_json: bool) -> None:
    payer, payee = people
    response = send_transfer(client, payer, payee, {"comment": "a\x00b"}, as_json=as_json)
    assert_problem(response, 400, "invalid_request")


@pytest.mark.parametrize(
    ("field", "code"),
    [
        ("username", "invalid_username"),
        ("password", "invalid_password"),
        ("full_name", "invalid_request"),
    ],
)
@pytest.mark.parametrize("surrogate", ["\\ud800", "\\udfff", "x\\ud83dy"])
def test_lone_surrogate_in_registration_json(client, field: str, code: str, surrogate) -> None:
    fields = {"username": "surrogate_tester", "password": "long enough", "full_name": ""}
    raw = json.dumps(fields).replace(f'"{field}": "', f'"{field}": "{surrogate}', 1)
    assert_problem(send_raw(client, "/users", raw, "application/json"), 400, code)


def test_lone_surrogate_in_comment(client, people) -> None:
    payer, payee = people
    raw = (
        f'{{"from": {payer.accounts["USD"]}, "to": {payee.accounts["USD"]}, '
        '"amount": "1", "comment": "bad \\ud800 text"}'
    )
    response = send_raw(client, f"/users/{payer.id}/transfers", raw, "application/json", payer.auth)
    assert_problem(response, 400, "invalid_request")


def test_lone_surrogate_amount_and_id(client, people) -> None:
    payer, payee = people
    path = f"/users/{payer.id}/transfers"
    raw = (
        f'{{"from": {payer.accounts["USD"]}, "to": {payee.accounts["USD"]}, "amount": "1\\ud800"}}'
    )
    assert_problem(
        send_raw(client, path, raw, "application/json", payer.auth), 400, "invalid_amount"
    )
    raw = f'{{"from": "\\udc00", "to": {payee.accounts["USD"]}, "amount": "1"}}'
    assert_problem(
        send_raw(client, path, raw, "application/json", payer.auth), 400, "invalid_request"
    )


@pytest.mark.parametrize(
    ("field", "length", "code"),
    [
        ("username", 10_000, "invalid_username"),
        ("password", 100_000, "invalid_password"),
        ("full_name", 10_000, "invalid_request"),
    ],
)
def test_very_long_registration_fields(client, field: str, length: int, code: str) -> None:
    fields = {"username": "long_tester", "password": "long enough", field: "x" * length}
    assert_problem(client.post("/users", json=fields), 400, code)


def test_very_long_comment(client, people) -> None:
    payer, payee = people
    response = send_transfer(client, payer, payee, {"comment": "x" * 100_000}, as_json=True)
    assert_problem(response, 400, "invalid_request")


def test_very_long_currency_in_path(client, people) -> None:
    payer, _ = people
    response = client.post(f"/users/{payer.id}/accounts/{'X' * 5000}", headers=payer.auth)
    assert_problem(response, 404, "currency_not_found")


def test_very_long_idempotency_key(client, people) -> None:
    payer, payee = people
    response = client.post(
        f"/users/{payer.id}/transfers",
        data={"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1"},
        headers={**payer.auth, "Idempotency-Key": "k" * 10_000},
    )
    assert_problem(response, 400, "invalid_request")


# --- wrong JSON types, field by field ---------------------------------------------------------

WRONG_TYPES: list[Any] = [None, True, 12345678, 1.5, [], ["x"], {}, {"a": "b"}]


@pytest.mark.parametrize(
    ("field", "code"),
    [
        ("username", "invalid_username"),
        ("password", "invalid_password"),
        ("full_name", "invalid_request"),
    ],
)
@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
def test_wrong_json_type_in_registration(client, field: str, code: str, value: Any) -> None:
    fields = {"username": "type_tester", "password": "long enough", field: value}
    assert_problem(client.post("/users", json=fields), 400, code)


@pytest.mark.parametrize(
    ("field", "code"),
    [("from", "invalid_request"), ("to", "invalid_request"), ("comment", "invalid_request")],
)
@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
def test_wrong_json_type_in_transfer(client, people, field: str, code: str, value: Any) -> None:
    if field in ("from", "to") and value == 12345678:
        value = "12 345 678"  # an integer is the right type for an id
    payer, payee = people
    response = send_transfer(client, payer, payee, {field: value}, as_json=True)
    assert_problem(response, 400, code)


@pytest.mark.parametrize("value", [None, True, [], ["1"], {}, {"a": "b"}], ids=repr)
def test_wrong_json_type_for_amount(client, people, value: Any) -> None:
    payer, payee = people
    response = send_transfer(client, payer, payee, {"amount": value}, as_json=True)
    assert_problem(response, 400, "invalid_amount")


# --- bodies that are not a JSON object, or not JSON at all ----------------------------------

NOT_AN_OBJECT = ["[]", '["username"]', '"text"', "1", "null", "true", "1.5"]
NOT_JSON: list[bytes] = [
    b"",
    b"{",
    b"}",
    b"{'username': 'x'}",
    b'{"username": "x",}',
    b'{"username": "x"} trailing',
    b'{"a": "\xff\xfe"}',
    b"\xef\xbb\xbf\xff",
    b"username=x&password=y",
    b'{"a": 1e}',
    b'{"a": .5}',
    b'{"a": 01}',
    b"\x00\x00\x00",
]
DEEP = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"username": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
]


def _public_and_private_posts(people) -> list[tuple[str, dict[str, str]]]:
    payer, _ = people
    return [
        ("/users", {}),
        (f"/users/{payer.id}/transfers", payer.auth),
        (f"/users/{payer.id}/transfers/batch", payer.auth),
        (f"/accounts/{payer.accounts['USD']}/deposits", SUPERUSER.auth),
        (f"/users/{payer.id}/transfers/1/refunds", payer.auth),
        (f"/users/{payer.id}/payouts", payer.auth),
    ]


@pytest.mark.parametrize("raw", NOT_AN_OBJECT)
def test_json_that_is_not_an_object(client, people, raw: str) -> None:
    for path, auth in _public_and_private_posts(people):
        assert_problem(
            send_raw(client, path, raw, "application/json", auth), 400, "invalid_request"
        )


@pytest.mark.parametrize("raw", NOT_JSON, ids=repr)
def test_invalid_json(client, people, raw: bytes) -> None:
    for path, auth in _public_and_private_posts(people):
        assert_problem(
            send_raw(client, path, raw, "application/json", auth), 400, "invalid_request"
        )


@pytest.mark.parametrize("raw", DEEP, ids=["array", "object", "field"])
def test_deeply_nested_json(client, people, raw: bytes) -> None:
    for path, auth in _public_and_private_posts(people):
        assert_problem(
            send_raw(client, path, raw, "application/json", auth), 400, "invalid_request"
        )


def test_moderately_nested_field_value(client, people) -> None:
    payer, payee = people
    nested: Any = "1"
    for _ in range(500):
        nested = [nested]
    response = send_transfer(client, payer, payee, {"amount": nested}, as_json=True)
    assert_problem(response, 400, "invalid_amount")


def test_json_media_type_parameters_and_suffix(client) -> None:
    fields = {"username": "media_tester", "password": "long enough"}
    raw = json.dumps(fields)
    response = send_raw(client, "/users", raw, "application/json; charset=utf-8")
    assert response.status_code == 201, response.get_json()
    fields["username"] = "media_tester_2"
    response = send_raw(client, "/users", json.dumps(fields), "APPLICATION/JSON")
    assert response.status_code == 201, response.get_json()


# --- media types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/xml", "application/octet-stream", "text/csv", "image/png", ""],
)
def test_unsupported_media_type(client, people, content_type: str) -> None:
    for path, auth in _public_and_private_posts(people):
        headers = dict(auth)
        environ = {"CONTENT_TYPE": content_type} if content_type else {}
        response = client.post(
            path, data=b"username=x&amount=1", headers=headers, environ_overrides=environ
        )
        assert_problem(response, 415, "unsupported_media_type")


def test_empty_body_without_a_media_type_is_missing_fields(client) -> None:
    response = client.post("/users")
    assert_problem(response, 400, "invalid_username")


# --- payload too large --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "form", "multipart", "raw"])
def test_body_over_one_mebibyte(client, people, encoding: str) -> None:
    big = "x" * (MIB + 1)
    for path, auth in _public_and_private_posts(people):
        if encoding == "json":
            response = client.post(path, json={"full_name": big}, headers=auth)
        elif encoding == "form":
            response = client.post(path, data={"full_name": big}, headers=auth)
        elif encoding == "multipart":
            response = client.post(
                path, data={"full_name": big}, headers=auth, content_type="multipart/form-data"
            )
        else:
            response = client.post(path, data=big.encode(), headers=auth)
        assert_problem(response, 413, "payload_too_large")


def test_body_just_under_one_mebibyte_is_read(client, people) -> None:
    payer, payee = people
    # Comfortably under the limit, yet far too long a comment: a 400, not a 413.
    response = send_transfer(client, payer, payee, {"comment": "x" * (MIB - 1000)}, as_json=True)
    assert_problem(response, 400, "invalid_request")


# --- unknown paths, wrong methods, ids that are not ids -----------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/users/1/nope",
        "/users/abc/accounts",
        "/users/-1/accounts",
        "/users/1.5/accounts",
        f"/users/{BIGINT_MAX + 1}/accounts",
        "/accounts/abc",
        "/accounts/-1",
        "/accounts/1.5",
        "/accounts/0x1",
        f"/accounts/{BIGINT_MAX + 1}",
        "/accounts/99999999999999999999",
        "/accounts/" + "9" * 5000,
        "/accounts/1/nope",
        f"/users/1/transfers/{BIGINT_MAX + 1}",
        # Paths with rules for other methods too (POST, DELETE): still no route, not 405.
        f"/users/{BIGINT_MAX + 1}/transfers",
        "/users/99999999999999999999/api-keys",
        f"/users/1/api-keys/{BIGINT_MAX + 1}",
        f"/users/1/webhooks/{BIGINT_MAX + 1}",
        "/users/1/transfers/abc",
        "/users/1/transfers/" + "9" * 5000,
        f"/users/1/transfers/{BIGINT_MAX + 1}/refunds",
        "/users/1/transfers/abc/refunds",
        "/users/abc/payouts",
        f"/users/{BIGINT_MAX + 1}/payouts",
        "/transfers",
    ],
)
@pytest.mark.parametrize("authenticated", [False, True], ids=["anonymous", "superuser"])
def test_unknown_path(client, path: str, authenticated: bool) -> None:
    headers = SUPERUSER.auth if authenticated else {}
    assert_problem(client.get(path, headers=headers), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/currencies"),
        ("POST", "/currencies"),
        ("GET", "/users"),
        ("DELETE", "/users"),
        ("PUT", "/users/2/accounts"),
        ("GET", "/users/2/accounts/USD"),
        ("DELETE", "/accounts/1"),
        ("POST", "/accounts/1"),
        ("GET", "/accounts/1/deposits"),
        ("POST", "/accounts/1/postings"),
        ("PUT", "/users/2/transfers"),
        ("PATCH", "/users/2/transfers/1"),
        ("DELETE", "/users/2/transfers/1"),
        ("GET", "/users/2/transfers/batch"),
        ("GET", "/users/2/transfers/1/refunds"),
        ("PUT", "/users/2/transfers/1/refunds"),
        ("GET", "/users/2/payouts"),
        ("DELETE", "/users/2/payouts"),
        ("POST", "/health"),
    ],
)
def test_method_not_allowed(client, method: str, path: str) -> None:
    response = client.open(path, method=method, headers=SUPERUSER.auth)
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["Allow"]
    assert method not in response.headers["Allow"].split(", ")


def test_largest_bigint_ids_are_routed_and_not_found(client, people) -> None:
    payer, _ = people
    big = BIGINT_MAX
    assert_problem(client.get(f"/accounts/{big}", headers=payer.auth), 404, "account_not_found")
    assert_problem(
        client.get(f"/accounts/{big}/postings", headers=payer.auth), 404, "account_not_found"
    )
    assert_problem(
        client.get(f"/users/{payer.id}/transfers/{big}", headers=payer.auth),
        404,
        "transfer_not_found",
    )
    assert_problem(
        client.post(f"/accounts/{big}/deposits", data={"amount": "1"}, headers=SUPERUSER.auth),
        404,
        "account_not_found",
    )
    assert_problem(
        client.get(f"/users/{big}/accounts", headers=SUPERUSER.auth), 404, "user_not_found"
    )


# --- query strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=" + "9" * 5000,
        "limit=%00",
        "sort=up",
        "sort=%00",
        "status=bogus",
        "from=abc",
        "to=" + "9" * 5000,
        "cursor=%00%01",
        "cursor=%FF%FE",
        "cursor=" + "9" * 5000,
        "cursor=YXNjOjk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5",
    ],
)
def test_bad_list_query(client, people, query: str) -> None:
    payer, _ = people
    for path in (f"/users/{payer.id}/transfers", f"/accounts/{payer.accounts['USD']}/postings"):
        response = client.get(f"{path}?{query}", headers=payer.auth)
        if query.startswith("status=") and "postings" in path:
            assert response.status_code == 200  # a statement has no status filter
            continue
        if query.startswith(("from=", "to=")) and "postings" in path:
            assert response.status_code == 200
            continue
        assert_problem(response, 400, "invalid_query")


@pytest.mark.parametrize("wait", ["abc", "-1", "31", "1e1", "0x1", "%00", "9" * 5000, "nan"])
def test_bad_wait(client, people, wait: str) -> None:
    payer, payee = people
    transfer = send_transfer(client, payer, payee, {}, as_json=True).get_json()
    response = client.get(
        f"/users/{payer.id}/transfers/{transfer['id']}?wait={wait}", headers=payer.auth
    )
    assert_problem(response, 400, "invalid_query")


def test_unknown_query_parameters_are_ignored(client, people) -> None:
    payer, _ = people
    response = client.get(f"/users/{payer.id}/transfers?colour=blue", headers=payer.auth)
    assert response.status_code == 200


# --- generated input (hypothesis) -------------------------------------------------------------

# Text that can travel in a form body (the test client encodes it as UTF-8).
form_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
amount_text = st.one_of(
    st.from_regex(r"[0-9]{0,17}(\.[0-9]{0,4})?", fullmatch=True),
    st.sampled_from(BAD_AMOUNT_TEXT),
    form_text,
)
idempotency_keys = st.one_of(
    st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=300)
)
GENERATED = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_answer_is_well_formed(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        assert_client_error(response)
    else:
        assert response.mimetype == "application/json"


@GENERATED
@given(data=st.data())
def test_generated_transfer_bodies(app, people, data) -> None:
    payer, payee = people
    client = app.test_client()
    ids = st.sampled_from([*payer.accounts.values(), *payee.accounts.values(), 0, BIGINT_MAX])
    as_json = data.draw(st.booleans(), label="as_json")
    if as_json:
        value = st.one_of(ids, amount_text, json_values)
        body = data.draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "from": st.one_of(ids, ids.map(str), value),
                    "to": st.one_of(ids, ids.map(str), value),
                    "amount": st.one_of(amount_text, value),
                    "comment": st.one_of(st.text(max_size=300), value),
                },
            ),
            label="json body",
        )
    else:
        body = data.draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "from": st.one_of(ids.map(str), form_text),
                    "to": st.one_of(ids.map(str), form_text),
                    "amount": amount_text,
                    "comment": st.text(st.characters(exclude_categories=["Cs"]), max_size=300),
                },
            ),
            label="form body",
        )
    headers = dict(payer.auth)
    key = data.draw(idempotency_keys, label="idempotency key")
    if key is not None:
        headers["Idempotency-Key"] = key
    path = f"/users/{payer.id}/transfers"
    if as_json:
        response = client.post(path, json=body, headers=headers)
    else:
        response = client.post(path, data=body, headers=headers)

    assert_answer_is_well_formed(response)
    if response.status_code == 202:
        transfer = response.get_json()
        assert transfer["from_user_id"] == payer.id
        assert transfer["status"] in ("pending", "settled", "rejected")
        assert transfer["amount"].count(".") == 1
        assert len(transfer["amount"].split(".")[1]) == 2


@GENERATED
@given(data=st.data())
def test_generated_registration_bodies(app, data) -> None:
    client = app.test_client()
    encoding = data.draw(st.sampled_from(["json", "form", "multipart"]), label="encoding")
    if encoding == "json":
        text, value = st.text(max_size=80), json_values
    else:
        text = value = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
    body = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "username": st.one_of(
                    st.from_regex(r"[A-Za-z0-9_@.+\-]{1,70}", fullmatch=True), text, value
                ),
                "password": st.one_of(text, value),
                "full_name": st.one_of(text, value),
            },
        ),
        label="body",
    )
    if encoding == "json":
        response = client.post("/users", json=body)
    elif encoding == "multipart":
        response = client.post("/users", data=body, content_type="multipart/form-data")
    else:
        response = client.post("/users", data=body)

    assert_answer_is_well_formed(response)
    if response.status_code == 201:
        created = response.get_json()
        assert created["username"] == body["username"]
        assert created["full_name"] == body.get("full_name", "")
        assert response.headers["Location"] == f"/users/{created['id']}"


@GENERATED
@given(
    raw=st.binary(max_size=300),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=xyz",
            "text/plain",
            "application/json; charset=latin-1",
            "",
        ]
    ),
)
def test_generated_raw_bodies(app, people, raw: bytes, content_type: str) -> None:
    payer, _ = people
    client = app.test_client()
    for path, auth in [("/users", {}), (f"/users/{payer.id}/transfers", payer.auth)]:
        environ = {"CONTENT_TYPE": content_type} if content_type else {}
        response = client.post(path, data=raw, headers=auth, environ_overrides=environ)
        assert_answer_is_well_formed(response)


# --- holds (docs/api.md "Holds") ----------------------------------------------------------


def _hold_posts(client, people) -> list[str]:
    payer, payee = people
    fields = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": "1"}
    hold = client.post(f"/users/{payer.id}/holds", json=fields, headers=payer.auth)
    assert hold.status_code == 202, hold.get_json()
    hold_id = hold.get_json()["id"]
    return [
        f"/users/{payer.id}/holds",
        f"/users/{payer.id}/holds/{hold_id}/capture",
        f"/users/{payer.id}/holds/{hold_id}/void",
        f"/users/{payer.id}/holds/{MISSING_HOLD}/capture",
    ]


MISSING_HOLD = 2**62


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
@pytest.mark.parametrize("amount", BAD_AMOUNT_TEXT, ids=repr)
def test_bad_amount_in_a_hold(client, people, amount: str, as_json: bool) -> None:
    payer, payee = people
    fields = {"from": payer.accounts["USD"], "to": payee.accounts["USD"], "amount": amount}
    path = f"/users/{payer.id}/holds"
    if as_json:
        response = client.post(path, json=fields, headers=payer.auth)
    else:
        response = client.post(path, data=fields, headers=payer.auth)
    assert_problem(response, 400, "invalid_amount")


@pytest.mark.parametrize("amount", [*BAD_AMOUNT_TEXT, None, True, [], {}], ids=repr)
def test_bad_amount_in_a_capture(client, people, amount: Any) -> None:
    payer, _ = people
    for path in _hold_posts(client, people)[1:4:2]:
        body = assert_client_error(client.post(path, json={"amount": amount}, headers=payer.auth))
        assert body["code"] in ("invalid_amount", "hold_not_active", "hold_not_found")


@pytest.mark.parametrize("raw", [*NOT_AN_OBJECT, *NOT_JSON, *DEEP], ids=repr)
def test_hold_bodies_that_are_not_a_json_object(client, people, raw: bytes | str) -> None:
    payer, _ = people
    for path in _hold_posts(client, people):
        response = send_raw(client, path, raw, "application/json", payer.auth)
        if path.endswith("/void"):
            # A void reads no body: whatever comes with it is ignored.
            assert response.status_code in (202, 409), response.get_json()
        else:
            assert_problem(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "query", ["wait=-1", "wait=31", "wait=1e1", "wait=%00", "wait=" + "9" * 5000]
)
def test_bad_hold_wait(client, people, query: str) -> None:
    payer, _ = people
    response = client.get(f"/users/{payer.id}/holds/{MISSING_HOLD}?{query}", headers=payer.auth)
    assert_problem(response, 400, "invalid_query")


# --- refunds and payouts: generated bodies ------------------------------------------------------


@pytest.fixture(scope="module")
def refundable(app, settlement_worker, people) -> tuple[Member, int]:
    """The payee of `people` and a settled payment it received (so refunds may pass)."""
    api = Api(app.test_client())
    _, payee = people
    payer = api.funded("100.00")
    response = api.transfer(payer, payer.accounts["USD"], payee.accounts["USD"], "50.00")
    assert api.wait_final(payer, response.get_json()["id"])["status"] == "settled"
    return payee, response.get_json()["id"]


def _optional_fields(data, fields: dict[str, Any], label: str) -> dict[str, Any]:
    return data.draw(st.fixed_dictionaries({}, optional=fields), label=label)


@GENERATED
@given(data=st.data())
def test_generated_refund_bodies(app, refundable, data) -> None:
    payee, transfer_id = refundable
    client = app.test_client()
    as_json = data.draw(st.booleans(), label="as_json")
    if as_json:
        body = _optional_fields(
            data,
            {
                "amount": st.one_of(amount_text, json_values),
                "comment": st.one_of(st.text(max_size=300), json_values),
            },
            "json body",
        )
    else:
        body = _optional_fields(
            data,
            {
                "amount": amount_text,
                "comment": st.text(st.characters(exclude_categories=["Cs"]), max_size=300),
            },
            "form body",
        )
    headers = dict(payee.auth)
    key = data.draw(idempotency_keys, label="idempotency key")
    if key is not None:
        headers["Idempotency-Key"] = key
    target = data.draw(st.sampled_from([transfer_id, 0, BIGINT_MAX]), label="transfer")
    path = f"/users/{payee.id}/transfers/{target}/refunds"
    if as_json:
        response = client.post(path, json=body, headers=headers)
    else:
        response = client.post(path, data=body, headers=headers)
    assert_answer_is_well_formed(response)
    if response.status_code == 202:
        assert response.get_json()["refund_of"] == transfer_id


@GENERATED
@given(data=st.data())
def test_generated_payout_bodies(app, people, data) -> None:
    payer, payee = people
    client = app.test_client()
    ids = st.sampled_from([*payer.accounts.values(), *payee.accounts.values(), 0, BIGINT_MAX])
    as_json = data.draw(st.booleans(), label="as_json")
    if as_json:
        body = _optional_fields(
            data,
            {
                "from": st.one_of(ids, ids.map(str), json_values),
                "amount": st.one_of(amount_text, json_values),
                "destination": st.one_of(st.text(max_size=220), json_values),
                "comment": st.one_of(st.text(max_size=300), json_values),
            },
            "json body",
        )
    else:
        form = st.text(st.characters(exclude_categories=["Cs"]), max_size=220)
        body = _optional_fields(
            data,
            {
                "from": st.one_of(ids.map(str), form_text),
                "amount": amount_text,
                "destination": form,
                "comment": form,
            },
            "form body",
        )
    headers = dict(payer.auth)
    key = data.draw(idempotency_keys, label="idempotency key")
    if key is not None:
        headers["Idempotency-Key"] = key
    path = f"/users/{payer.id}/payouts"
    if as_json:
        response = client.post(path, json=body, headers=headers)
    else:
        response = client.post(path, data=body, headers=headers)
    assert_answer_is_well_formed(response)
    if response.status_code == 202:
        payout = response.get_json()
        assert payout["kind"] == "payout"
        assert payout["destination"] == body["destination"]
        assert payout["destination"].isprintable()
