"""docs/api.md: GET /currencies, POST /users, GET /users/{id}/accounts, GET /health."""

from __future__ import annotations

import json
import re
import secrets

import pytest

from tests.conftest import SUPERUSER, assert_problem, basic_auth

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
USER_FIELDS = {"id", "username", "full_name", "created_at"}
# held and available: docs/api.md "Holds".
ACCOUNT_FIELDS = {"id", "user_id", "currency", "kind", "balance", "held", "available", "created_at"}
# Far above any id a test run creates.
MISSING_ID = 2**62


def fresh_username(prefix: str = "u") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def register(client, **fields: object):
    body = {"username": fresh_username(), "password": "a good password", **fields}
    return client.post("/users", json=body)


# --- GET /currencies -------------------------------------------------------------------


def test_currencies_are_the_seed_ordered_by_code(client) -> None:
    response = client.get("/currencies")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == [
        {"code": "CNY", "name": "Chinese Yuan", "decimals": 2, "commission_rate": "0.02"},
        {"code": "EUR", "name": "Euro", "decimals": 2, "commission_rate": "0.03"},
        {"code": "USD", "name": "United States Dollar", "decimals": 2, "commission_rate": "0.01"},
    ]


# --- GET /health -------------------------------------------------------------------------


def test_health_names_database_and_broker(client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"status": "ok", "database": "ok", "broker": "ok"}


# --- POST /users -------------------------------------------------------------------------


def _post_user(client, encoding: str, fields: dict[str, str]):
    if encoding == "json":
        return client.post("/users", json=fields)
    if encoding == "multipart":
        return client.post("/users", data=fields, content_type="multipart/form-data")
    return client.post("/users", data=fields)


@pytest.mark.parametrize("encoding", ["form", "multipart", "json"])
def test_register_in_every_body_encoding(client, encoding: str) -> None:
    username = fresh_username(encoding)
    fields = {"username": username, "password": "s3cret password", "full_name": "Ada Lovelace"}
    response = _post_user(client, encoding, fields)

    assert response.status_code == 201, response.get_json()
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == USER_FIELDS
    assert isinstance(body["id"], int)
    assert body["id"] > 1
    assert body["username"] == username
    assert body["full_name"] == "Ada Lovelace"
    assert RFC3339_UTC.match(body["created_at"])
    assert response.headers["Location"] == f"/users/{body['id']}"
    assert "s3cret password" not in response.get_data(as_text=True)
    # The new credentials work at once.
    accounts = client.get(
        f"/users/{body['id']}/accounts", headers=basic_auth(username, "s3cret password")
    )
    assert accounts.status_code == 200


def test_full_name_is_optional_and_defaults_to_empty(client) -> None:
    response = client.post("/users", data={"username": fresh_username(), "password": "12345678"})
    assert response.status_code == 201
    assert response.get_json()["full_name"] == ""


def test_full_name_is_any_unicode_up_to_200_characters(client) -> None:
    name = "Zoë 张伟 😀 Ωμέγα "
    name = (name * 20)[:200]
    response = register(client, full_name=name)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["full_name"] == name


def test_registration_opens_one_zero_balance_account_per_currency(api) -> None:
    member = api.register()
    response = api.client.get(f"/users/{member.id}/accounts", headers=member.auth)

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    accounts = response.get_json()
    assert len(accounts) == 3
    assert sorted(a["currency"] for a in accounts) == ["CNY", "EUR", "USD"]
    ids = [a["id"] for a in accounts]
    assert ids == sorted(ids)
    for account in accounts:
        assert set(account) == ACCOUNT_FIELDS
        assert account["user_id"] == member.id
        assert account["kind"] == "user"
        assert account["balance"] == "0.00"
        assert RFC3339_UTC.match(account["created_at"])


def test_accounts_list_is_ordered_by_id_and_includes_opened_accounts(api) -> None:
    member = api.register()
    opened = api.client.post(f"/users/{member.id}/accounts/EUR", headers=member.auth)
    assert opened.status_code == 201
    accounts = api.client.get(f"/users/{member.id}/accounts", headers=member.auth).get_json()
    assert [a["id"] for a in accounts] == sorted([*member.accounts.values(), opened.json["id"]])
    assert [a["currency"] for a in accounts].count("EUR") == 2


def test_superuser_accounts_are_its_commission_and_external_accounts(client) -> None:
    response = client.get("/users/1/accounts", headers=SUPERUSER.auth)
    assert response.status_code == 200
    kinds = sorted((a["currency"], a["kind"]) for a in response.get_json())
    assert kinds == [
        ("CNY", "commission"),
        ("CNY", "external"),
        ("EUR", "commission"),
        ("EUR", "external"),
        ("USD", "commission"),
        ("USD", "external"),
    ]


def test_username_taken(client) -> None:
    username = fresh_username()
    assert register(client, username=username).status_code == 201
    assert_problem(register(client, username=username), 409, "username_taken")


def test_the_superuser_name_is_taken_in_any_case(client) -> None:
    assert_problem(register(client, username="SuperUser"), 409, "username_taken")


@pytest.mark.parametrize(("first", "second"), [("Alice", "alice"), ("bob", "BOB")])
def test_username_taken_ignores_case(client, first: str, second: str) -> None:
    suffix = secrets.token_hex(4)
    assert register(client, username=first + suffix).status_code == 201
    assert_problem(register(client, username=second + suffix), 409, "username_taken")


def test_taken_username_keeps_the_first_password(client) -> None:
    username = fresh_username()
    first = register(client, username=username, password="first password")
    register(client, username=username, password="second password")
    # The first registration's password still works; the second did not overwrite it.
    auth = basic_auth(username, "first password")
    assert client.get(f"/users/{first.json['id']}/accounts", headers=auth).status_code == 200
    auth = basic_auth(username, "second password")
    assert client.get(f"/users/{first.json['id']}/accounts", headers=auth).status_code == 401


@pytest.mark.parametrize(
    "template",
    ["y" * 56 + "{tag}", "A-Za-z0-9_@.+-{tag}", "mail+{tag}@example.org", "{tag}"],
)
def test_valid_usernames(client, template: str) -> None:
    username = template.format(tag=secrets.token_hex(4))
    assert len(username) <= 64
    response = register(client, username=username)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["username"] == username


def test_one_character_username_is_valid(client) -> None:
    response = register(client, username=secrets.choice("abcdefghijklmnopqrstuvwxyz_@.+-"))
    # 409 also proves the name passed validation (another test may hold it already).
    assert response.status_code in (201, 409), response.get_json()


@pytest.mark.parametrize(
    "username",
    [
        "",
        "x" * 65,
        "has space",
        " leading",
        "trailing ",
        "trailing\n",
        "tab\tname",
        "colon:name",
        "semi;colon",
        "slash/name",
        "<script>",
        "ümlaut",
        "nul\x00name",
        "\ufeffbom",
        "\uff46\uff55\uff4c\uff4c",  # full-width "full"
    ],
)
def test_invalid_username(client, username: str) -> None:
    assert_problem(register(client, username=username), 400, "invalid_username")


@pytest.mark.parametrize("password", ["", "1234567", "x" * 1025, "nul\x00password"])
def test_invalid_password(client, password: str) -> None:
    assert_problem(register(client, password=password), 400, "invalid_password")


@pytest.mark.parametrize("password", ["12345678", "p" * 1024, "пароль-пароль", "with:colon"])
def test_password_boundaries_and_charset(client, password: str) -> None:
    username = fresh_username()
    response = register(client, username=username, password=password)
    assert response.status_code == 201, response.get_json()
    user_id = response.get_json()["id"]
    auth = basic_auth(username, password)
    assert client.get(f"/users/{user_id}/accounts", headers=auth).status_code == 200


@pytest.mark.parametrize("full_name", ["x" * 201, "nul\x00name"])
def test_invalid_full_name(client, full_name: str) -> None:
    assert_problem(register(client, full_name=full_name), 400, "invalid_request")


@pytest.mark.parametrize(
    ("missing", "code"),
    [("username", "invalid_username"), ("password", "invalid_password")],
)
def test_missing_field(client, missing: str, code: str) -> None:
    fields = {"username": fresh_username(), "password": "a good password"}
    del fields[missing]
    assert_problem(client.post("/users", data=fields), 400, code)


def test_lone_surrogate_in_json_username_and_password(client) -> None:
    raw = '{"username": "bad\\ud800", "password": "a good password"}'
    response = client.post("/users", data=raw, content_type="application/json")
    assert_problem(response, 400, "invalid_username")
    raw = json.dumps({"username": fresh_username()})[:-1] + ', "password": "\\udfffxxxxxxxx"}'
    response = client.post("/users", data=raw, content_type="application/json")
    assert_problem(response, 400, "invalid_password")


def test_extra_fields_are_ignored(client) -> None:
    response = register(client, id=1, is_superuser=True, balance="1000000.00")
    assert response.status_code == 201
    assert response.get_json()["id"] != 1


# --- user_not_found ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/users/{MISSING_ID}/accounts",
        f"/users/{MISSING_ID}/transfers",
        f"/users/{MISSING_ID}/transfers/1",
    ],
)
def test_superuser_reading_a_user_that_does_not_exist(client, path: str) -> None:
    assert_problem(client.get(path, headers=SUPERUSER.auth), 404, "user_not_found")
