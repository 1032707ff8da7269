"""docs/api.md's auth rules, parametrized over every authenticated route.

Actors: anonymous, wrong credentials, malformed Authorization headers, another
user, the owner and the superuser. Plus the login throttle, the cost of a failed
login, the verification cache and the headers of authenticated responses.
"""

from __future__ import annotations

import base64
import io
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import text

from common import passwords
from common.db import script_session
from common.passwords import hash_password
from common.settings import Settings
from common.users import announce_credentials_changed
from tests.conftest import SUPERUSER, SUPERUSER_PASSWORD, Api, Member, assert_problem, basic_auth
from web.throttle import KEY_PREFIX
from worker.cli import main as cli

# The throttle's limits as the suite runs it: Settings' defaults.
MAX_FAILURES_PER_USERNAME = Settings.model_fields["login_failures_per_username"].default
MAX_FAILURES_PER_ADDRESS = Settings.model_fields["login_failures_per_address"].default
WINDOW_S = Settings.model_fields["login_throttle_window_s"].default

CHALLENGE = 'Basic realm="remit", Bearer realm="remit"'
OWNER_FULL_NAME = "Owner Confidential-Name"
SECRET_COMMENT = "secret-comment-7f3a"
SECRET_DEPOSIT = "4242.42"


def assert_unauthorized(response) -> None:
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == CHALLENGE


@dataclass
class World:
    owner: Member
    other: Member
    third: Member
    transfer_id: int

    def secrets(self) -> list[str]:
        """Text that only the owner (or the superuser) may ever see."""
        return [self.owner.username, OWNER_FULL_NAME, SECRET_COMMENT, SECRET_DEPOSIT]


@pytest.fixture(scope="module")
def world(app, settlement_worker) -> World:
    api = Api(app.test_client())
    response = api.client.post(
        "/users",
        data={
            "username": "owner_" + secrets.token_hex(6),
            "password": "owner password",
            "full_name": OWNER_FULL_NAME,
        },
    )
    assert response.status_code == 201
    owner = Member(response.get_json()["id"], response.get_json()["username"], "owner password")
    owner.accounts = {
        a["currency"]: a["id"]
        for a in api.client.get(f"/users/{owner.id}/accounts", headers=owner.auth).get_json()
    }
    deposit = api.deposit(owner.accounts["USD"], SECRET_DEPOSIT)
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    other, third = api.register("other"), api.register("third")
    sent = api.transfer(
        owner, owner.accounts["USD"], third.accounts["USD"], "1.00", comment=SECRET_COMMENT
    )
    assert sent.status_code == 202
    assert api.wait_final(owner, sent.get_json()["id"])["status"] == "settled"
    return World(owner, other, third, sent.get_json()["id"])


@dataclass(frozen=True)
class Route:
    method: str
    path: Callable[[World], str]
    body: Callable[[World], dict[str, Any]] | None
    # What the owner, another user and the superuser get: (status, problem code or None).
    owner: tuple[int, str | None]
    other: tuple[int, str | None]
    superuser: tuple[int, str | None]
    # The batch route takes JSON only; the others get a form body.
    as_json: bool = False

    def call(self, client, world: World, headers: dict[str, str]):
        path, body = self.path(world), self.body(world) if self.body else None
        if self.as_json:
            return client.open(path, method=self.method, json=body, headers=headers)
        return client.open(path, method=self.method, data=body, headers=headers)


OK = (200, None)
FORBIDDEN = (403, "forbidden")

ROUTES = {
    "list accounts": Route(
        "GET", lambda w: f"/users/{w.owner.id}/accounts", None, OK, FORBIDDEN, OK
    ),
    "open account": Route(
        "POST",
        lambda w: f"/users/{w.owner.id}/accounts/EUR",
        None,
        (201, None),
        FORBIDDEN,
        FORBIDDEN,
    ),
    "get account": Route(
        "GET",
        lambda w: f"/accounts/{w.owner.accounts['USD']}",
        None,
        OK,
        (404, "account_not_found"),
        OK,
    ),
    "statement": Route(
        "GET",
        lambda w: f"/accounts/{w.owner.accounts['USD']}/postings",
        None,
        OK,
        (404, "account_not_found"),
        OK,
    ),
    "deposit": Route(
        "POST",
        lambda w: f"/accounts/{w.owner.accounts['USD']}/deposits",
        lambda w: {"amount": "0.01"},
        FORBIDDEN,
        FORBIDDEN,
        (202, None),
    ),
    "submit transfer": Route(
        "POST",
        lambda w: f"/users/{w.owner.id}/transfers",
        lambda w: {"from": w.owner.accounts["USD"], "to": w.third.accounts["USD"], "amount": "1"},
        (202, None),
        FORBIDDEN,
        FORBIDDEN,
    ),
    "submit batch": Route(
        "POST",
        lambda w: f"/users/{w.owner.id}/transfers/batch",
        lambda w: {
            "transfers": [
                {"from": w.owner.accounts["USD"], "to": w.third.accounts["USD"], "amount": "1"}
            ]
        },
        (202, None),
        FORBIDDEN,
        FORBIDDEN,
        as_json=True,
    ),
    "list transfers": Route(
        "GET", lambda w: f"/users/{w.owner.id}/transfers", None, OK, FORBIDDEN, OK
    ),
    "get transfer": Route(
        "GET",
        lambda w: f"/users/{w.owner.id}/transfers/{w.transfer_id}",
        None,
        OK,
        FORBIDDEN,
        OK,
    ),
}
route_names = pytest.mark.parametrize("route_name", list(ROUTES))


def _basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


MALFORMED_AUTHORIZATION = {
    "garbage": "garbage",
    "basic bangs": "Basic !!!",
    "not base64": "Basic not*base64@@",
    "truncated base64": "Basic dXNlcjpwYXNz=",
    "no colon": _basic(b"justausername"),
    "empty credentials": _basic(b":"),
    "not utf-8": _basic(b"\xff\xfe:\xff"),
    "scheme only": "Basic",
    "scheme and space": "Basic ",
    "bearer": "Bearer x",
    "digest": 'Digest username="superuser"',
    "nul": _basic(b"superuser\x00:x"),
    "huge": _basic(b"u" * 5000 + b":" + b"p" * 5000),
}


def assert_no_secrets(response, world: World) -> None:
    text = response.get_data(as_text=True)
    for secret in world.secrets():
        assert secret not in text, f"{secret!r} leaked: {text}"


def assert_outcome(response, expected: tuple[int, str | None]) -> None:
    status, code = expected
    if code is None:
        assert response.status_code == status, response.get_data(as_text=True)
        assert response.mimetype == "application/json"
    else:
        assert_problem(response, status, code)


# --- who gets what, on every route -------------------------------------------------------


@route_names
def test_anonymous_is_unauthorized(client, world, route_name: str) -> None:
    response = ROUTES[route_name].call(client, world, {})
    assert_unauthorized(response)
    assert_no_secrets(response, world)


@route_names
def test_wrong_password_is_unauthorized(client, world, route_name: str) -> None:
    headers = basic_auth(world.owner.username, world.owner.password + "x")
    response = ROUTES[route_name].call(client, world, headers)
    assert_unauthorized(response)
    assert_no_secrets(response, world)


@route_names
def test_unknown_username_is_unauthorized(client, world, route_name: str) -> None:
    response = ROUTES[route_name].call(client, world, basic_auth("nobody-here", "password"))
    assert_unauthorized(response)
    assert_no_secrets(response, world)


@route_names
def test_superuser_with_a_wrong_password_is_unauthorized(client, world, route_name: str) -> None:
    headers = basic_auth(SUPERUSER.username, SUPERUSER.password + "x")
    response = ROUTES[route_name].call(client, world, headers)
    assert_unauthorized(response)
    assert_no_secrets(response, world)


@route_names
@pytest.mark.parametrize("header", list(MALFORMED_AUTHORIZATION))
def test_malformed_authorization_is_unauthorized(
    client, world, route_name: str, header: str
) -> None:
    headers = {"Authorization": MALFORMED_AUTHORIZATION[header]}
    response = ROUTES[route_name].call(client, world, headers)
    assert_unauthorized(response)
    assert_no_secrets(response, world)


@route_names
def test_another_user(client, world, route_name: str) -> None:
    route = ROUTES[route_name]
    response = route.call(client, world, world.other.auth)
    assert_outcome(response, route.other)
    assert_no_secrets(response, world)


@route_names
def test_owner(client, world, route_name: str) -> None:
    route = ROUTES[route_name]
    response = route.call(client, world, world.owner.auth)
    assert_outcome(response, route.owner)
    if route_name == "submit batch":
        [result] = response.get_json()["results"]
        assert result["status"] == 202, result


@route_names
def test_superuser(client, world, route_name: str) -> None:
    route = ROUTES[route_name]
    response = route.call(client, world, SUPERUSER.auth)
    assert_outcome(response, route.superuser)


def test_owner_sees_its_own_data(client, world) -> None:
    owner = world.owner
    transfer = client.get(f"/users/{owner.id}/transfers/{world.transfer_id}", headers=owner.auth)
    assert transfer.get_json()["comment"] == SECRET_COMMENT
    statement = client.get(f"/accounts/{owner.accounts['USD']}/postings", headers=owner.auth)
    assert statement.get_json()[0]["amount"] == SECRET_DEPOSIT


def test_superuser_reads_the_owners_data(client, world) -> None:
    owner = world.owner
    accounts = client.get(f"/users/{owner.id}/accounts", headers=SUPERUSER.auth).get_json()
    assert {a["user_id"] for a in accounts} == {owner.id}
    assert {a["id"] for a in accounts} >= set(owner.accounts.values())
    transfer = client.get(
        f"/users/{owner.id}/transfers/{world.transfer_id}", headers=SUPERUSER.auth
    ).get_json()
    assert transfer["comment"] == SECRET_COMMENT
    listed = client.get(f"/users/{owner.id}/transfers", headers=SUPERUSER.auth).get_json()
    assert world.transfer_id in [t["id"] for t in listed]
    statement = client.get(
        f"/accounts/{owner.accounts['USD']}/postings", headers=SUPERUSER.auth
    ).get_json()
    assert statement[0]["amount"] == SECRET_DEPOSIT


# --- another user through its own paths: others' resources are not found ----------------


def test_others_transfer_through_own_path_is_not_found(client, world) -> None:
    other = world.other
    response = client.get(f"/users/{other.id}/transfers/{world.transfer_id}", headers=other.auth)
    assert_problem(response, 404, "transfer_not_found")
    assert_no_secrets(response, world)


def test_others_transfers_do_not_show_in_own_list(client, world) -> None:
    other = world.other
    for query in ("", f"?from={world.owner.id}", f"?to={world.third.id}"):
        response = client.get(f"/users/{other.id}/transfers{query}", headers=other.auth)
        assert response.status_code == 200
        assert response.get_json() == []
        assert_no_secrets(response, world)


def test_paying_from_others_account_is_not_found(client, world) -> None:
    other = world.other
    response = client.post(
        f"/users/{other.id}/transfers",
        data={"from": world.owner.accounts["USD"], "to": other.accounts["USD"], "amount": "1"},
        headers=other.auth,
    )
    assert_problem(response, 404, "account_not_found")
    assert_no_secrets(response, world)


def test_others_account_and_a_missing_account_look_the_same(client, world) -> None:
    other = world.other
    theirs = client.get(f"/accounts/{world.owner.accounts['EUR']}", headers=other.auth)
    missing = client.get(f"/accounts/{2**62}", headers=other.auth)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.get_json()["code"] == missing.get_json()["code"] == "account_not_found"


def test_others_transfer_and_a_missing_transfer_look_the_same(client, world) -> None:
    other = world.other
    theirs = client.get(f"/users/{other.id}/transfers/{world.transfer_id}", headers=other.auth)
    missing = client.get(f"/users/{other.id}/transfers/{2**62}", headers=other.auth)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.get_json()["code"] == missing.get_json()["code"] == "transfer_not_found"


def test_superuser_accounts_are_not_visible_to_users(client, world) -> None:
    superuser_accounts = client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    for account in superuser_accounts:
        response = client.get(f"/accounts/{account['id']}", headers=world.other.auth)
        assert_problem(response, 404, "account_not_found")
    assert_problem(client.get("/users/1/accounts", headers=world.other.auth), 403, "forbidden")


def test_batch_items_from_others_accounts_are_not_found(client, world) -> None:
    other = world.other
    response = client.post(
        f"/users/{other.id}/transfers/batch",
        json={
            "transfers": [
                {"from": world.owner.accounts["USD"], "to": other.accounts["USD"], "amount": "1"},
                {"from": other.accounts["USD"], "to": world.owner.accounts["USD"], "amount": "1"},
            ]
        },
        headers=other.auth,
    )
    assert response.status_code == 202
    stolen, paying_in = response.get_json()["results"]
    assert stolen["status"] == 404
    assert stolen["error"]["code"] == "account_not_found"
    # Paying *into* someone's account is allowed (any `to`), and shows nothing of theirs.
    assert paying_in["status"] == 202
    assert_no_secrets(response, world)


def test_long_poll_on_others_transfer_is_not_found_at_once(client, world) -> None:
    other = world.other
    started = time.monotonic()
    response = client.get(
        f"/users/{other.id}/transfers/{world.transfer_id}?wait=5", headers=other.auth
    )
    assert_problem(response, 404, "transfer_not_found")
    assert time.monotonic() - started < 2
    assert_no_secrets(response, world)


def test_superuser_cannot_pay_even_from_its_own_accounts(client, world) -> None:
    accounts = client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    [commission] = [
        a["id"] for a in accounts if a["currency"] == "USD" and a["kind"] == "commission"
    ]
    response = client.post(
        "/users/1/transfers",
        data={"from": commission, "to": world.other.accounts["USD"], "amount": "0.01"},
        headers=SUPERUSER.auth,
    )
    assert_problem(response, 403, "forbidden")


def test_username_is_case_insensitive_at_login(client, world) -> None:
    headers = basic_auth(world.other.username.upper(), world.other.password)
    assert client.get(f"/users/{world.other.id}/accounts", headers=headers).status_code == 200


# --- public routes ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/currencies", "/health", "/openapi.json", "/docs"])
def test_public_routes_need_no_credentials(client, path: str) -> None:
    assert client.get(path, follow_redirects=True).status_code == 200
    # Credentials are not even looked at there.
    garbage = {"Authorization": "Basic !!!"}
    assert client.get(path, headers=garbage, follow_redirects=True).status_code == 200


# --- login throttle ---------------------------------------------------------------------


def test_repeated_failed_logins_are_throttled(api) -> None:
    assert MAX_FAILURES_PER_USERNAME == 10
    victim, bystander = api.register(), api.register()
    path = f"/users/{victim.id}/accounts"
    wrong = basic_auth(victim.username, "not the password")
    for _ in range(MAX_FAILURES_PER_USERNAME):
        assert_unauthorized(api.client.get(path, headers=wrong))

    # Even the right password waits now: the throttle is checked before the password.
    for headers in (wrong, victim.auth):
        response = api.client.get(path, headers=headers)
        assert_problem(response, 429, "too_many_requests")
        assert 1 <= int(response.headers["Retry-After"]) <= WINDOW_S

    # Per username, ignoring case.
    shouting = basic_auth(victim.username.upper(), victim.password)
    assert_problem(api.client.get(path, headers=shouting), 429, "too_many_requests")
    # Another username from the same address is not affected.
    response = api.client.get(f"/users/{bystander.id}/accounts", headers=bystander.auth)
    assert response.status_code == 200


def test_fewer_failures_than_the_limit_are_not_throttled(api) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    wrong = basic_auth(member.username, "not the password")
    for _ in range(MAX_FAILURES_PER_USERNAME - 1):
        assert_unauthorized(api.client.get(path, headers=wrong))
    assert api.client.get(path, headers=member.auth).status_code == 200


def test_unknown_usernames_are_throttled_too(client) -> None:
    wrong = basic_auth("no-such-user-anywhere", "password")
    for _ in range(MAX_FAILURES_PER_USERNAME):
        assert_unauthorized(client.get("/users/2/accounts", headers=wrong))
    response = client.get("/users/2/accounts", headers=wrong)
    assert_problem(response, 429, "too_many_requests")
    assert int(response.headers["Retry-After"]) >= 1


def test_authenticated_responses_are_not_cached_and_not_sniffed(api: Api) -> None:
    member = api.register()
    for headers in (member.auth, basic_auth(member.username, "wrong password")):
        response = api.client.get(f"/users/{member.id}/accounts", headers=headers)
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    public = api.client.get("/currencies")
    assert public.headers["X-Content-Type-Options"] == "nosniff"


def _actor_headers(world: World, actor: str) -> dict[str, str]:
    return {
        "owner": world.owner.auth,
        "other": world.other.auth,
        "superuser": SUPERUSER.auth,
        "wrong password": basic_auth(world.owner.username, "not the password"),
        "malformed": {"Authorization": MALFORMED_AUTHORIZATION["not base64"]},
    }[actor]


@route_names
@pytest.mark.parametrize("actor", ["owner", "other", "superuser", "wrong password", "malformed"])
def test_every_answer_to_credentials_is_no_store_and_nosniff(
    client, world, route_name: str, actor: str
) -> None:
    response = ROUTES[route_name].call(client, world, _actor_headers(world, actor))
    assert response.headers["Cache-Control"] == "no-store", response.status_code
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@route_names
def test_anonymous_answers_are_nosniff_and_carry_no_banner(client, world, route_name) -> None:
    response = ROUTES[route_name].call(client, world, {})
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # The app itself names no server software (gunicorn adds a bare "Server: gunicorn",
    # see tests/test_security.py); Flask and Werkzeug add nothing in WSGI.
    assert "Server" not in response.headers
    assert "X-Powered-By" not in response.headers


# --- login throttle: per address, only failures count, no usernames kept -----------------


def test_repeated_failures_from_one_address_are_throttled(api) -> None:
    assert MAX_FAILURES_PER_ADDRESS == 100
    member = api.register()
    path = f"/users/{member.id}/accounts"
    attacker = {"REMOTE_ADDR": "198.51.100.7"}
    neighbour = {"REMOTE_ADDR": "198.51.100.8"}
    # A credential-stuffing run: each username fails once, so no username is throttled.
    for attempt in range(MAX_FAILURES_PER_ADDRESS):
        wrong = basic_auth(f"ghost-{attempt}", "password")
        assert_unauthorized(api.client.get(path, headers=wrong, environ_base=attacker))
    # The address now waits for anything, right credentials included...
    response = api.client.get(path, headers=member.auth, environ_base=attacker)
    assert_problem(response, 429, "too_many_requests")
    assert 1 <= int(response.headers["Retry-After"]) <= WINDOW_S
    # ...while the same user from another address is not affected.
    assert api.client.get(path, headers=member.auth, environ_base=neighbour).status_code == 200


def test_successful_logins_neither_count_nor_reset_failures(api) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    wrong = basic_auth(member.username, "not the password")
    for _ in range(MAX_FAILURES_PER_USERNAME - 1):
        assert_unauthorized(api.client.get(path, headers=wrong))
    # Basic auth logs in on every request: many successes are not failures...
    for _ in range(3 * MAX_FAILURES_PER_USERNAME):
        assert api.client.get(path, headers=member.auth).status_code == 200
    # ...nor do they wipe the failures (else an attacker could guess between them).
    assert_unauthorized(api.client.get(path, headers=wrong))
    assert_problem(api.client.get(path, headers=member.auth), 429, "too_many_requests")


def test_throttle_keeps_no_usernames(api, redis_client) -> None:
    username = "kept-nowhere-" + secrets.token_hex(4)
    assert_unauthorized(api.client.get("/users/2/accounts", headers=basic_auth(username, "x")))
    keys = [key.decode() for key in redis_client.scan_iter(KEY_PREFIX + "*")]
    assert keys, "the failure was not counted"
    assert not any(username in key for key in keys)
    assert all(len(key) < 120 for key in keys)


# --- constant-time credential checks ------------------------------------------------------


class CountingHasher:
    """The real argon2 hasher, counting verifications (what a failed login costs)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.verifications = 0

    def verify(self, stored_hash: str, password: str) -> bool:
        self.verifications += 1
        return self.real.verify(stored_hash, password)

    def hash(self, password: str) -> str:
        return self.real.hash(password)


@pytest.fixture
def argon2_calls(monkeypatch) -> CountingHasher:
    counting = CountingHasher(passwords.hasher())
    monkeypatch.setattr(passwords, "_hasher", counting)
    return counting


@pytest.mark.parametrize(
    "username",
    ["no-such-user", "x" * 65, "x" * 5000, "nul\x00name", "", "spa ce", "ünïcödé"],
    ids=["unknown", "too long", "huge", "nul", "empty", "space", "unicode"],
)
def test_an_unknown_username_costs_one_hash(client, argon2_calls, username: str) -> None:
    response = client.get("/users/2/accounts", headers=basic_auth(username, "some password"))
    assert_unauthorized(response)
    # Exactly what a wrong password for a real user costs: time does not tell which exist.
    assert argon2_calls.verifications == 1


def test_a_wrong_password_costs_one_hash_and_is_never_cached(api, argon2_calls) -> None:
    member = api.register()
    wrong = basic_auth(member.username, "not the password")
    before = argon2_calls.verifications
    for _ in range(3):
        assert_unauthorized(api.client.get(f"/users/{member.id}/accounts", headers=wrong))
    assert argon2_calls.verifications - before == 3


# --- the verification cache never outlives a password change ------------------------------


def test_a_changed_password_hash_defeats_the_cache_at_once(api, argon2_calls) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    assert api.client.get(path, headers=member.auth).status_code == 200
    before = argon2_calls.verifications
    assert api.client.get(path, headers=member.auth).status_code == 200
    assert argon2_calls.verifications == before, "the second login should be a cache hit"

    with script_session() as session, session.begin():
        session.execute(
            text("UPDATE users SET password_hash = :hash WHERE id = :id"),
            {"hash": hash_password("a completely new password"), "id": member.id},
        )
    # What every password change does once committed (bench/README: the login cache).
    announce_credentials_changed()
    # Well within the cache's lifetime, the old password is refused...
    assert_unauthorized(api.client.get(path, headers=member.auth))
    new = basic_auth(member.username, "a completely new password")
    assert api.client.get(path, headers=new).status_code == 200


def test_superuser_password_change_by_cli_defeats_a_warm_cache(
    api, argon2_calls, monkeypatch, capsys
) -> None:
    path = "/users/1/accounts"
    assert api.client.get(path, headers=SUPERUSER.auth).status_code == 200
    before = argon2_calls.verifications
    assert api.client.get(path, headers=SUPERUSER.auth).status_code == 200
    assert argon2_calls.verifications == before, "the old password should be cached"
    monkeypatch.setattr("sys.stdin", io.StringIO("the next superuser password\n"))
    try:
        assert cli(["set-superuser-password", "--password-stdin"]) == 0
        assert_unauthorized(api.client.get(path, headers=SUPERUSER.auth))
        new = basic_auth("superuser", "the next superuser password")
        assert api.client.get(path, headers=new).status_code == 200
    finally:
        monkeypatch.setattr("sys.stdin", io.StringIO(SUPERUSER_PASSWORD + "\n"))
        assert cli(["set-superuser-password", "--password-stdin"]) == 0
    assert api.client.get(path, headers=SUPERUSER.auth).status_code == 200
