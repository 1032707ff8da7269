"""docs/api.md "Overload": no new work in a currency whose settlement lags (503 with
Retry-After, nothing created), registrations limited per address (429), and 503 when
every hashing slot of the process is taken, while signed-in clients are still served."""

from __future__ import annotations

import contextlib
import http.client
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
from sqlalchemy import text

from common import passwords
from common.db import script_session
from common.doorbells import ring
from common.users import forget_logins
from tests.conftest import SUPERUSER, Api, Member, assert_problem, basic_auth, settlement_held
from tests.servers import environment, free_port, gunicorn_command, serving
from web import overload, throttle
from web.context import EXTENSION as SETTINGS

LAGGING, OTHER = "EUR", "USD"


def _fresh(app: Any) -> None:
    """The app's next check reads the backlog again (it would within a second anyway)."""
    backlog = app.extensions.get(overload.EXTENSION)
    if backlog is not None:
        backlog.forget()


def _counts() -> tuple[int, int]:
    with script_session() as session:
        row = session.execute(
            text("SELECT (SELECT count(*) FROM transfers), (SELECT count(*) FROM holds)")
        ).one()
        return int(row[0]), int(row[1])


@contextlib.contextmanager
def lagging(app: Any, api: Api, member: Member, currency: str = LAGGING) -> Iterator[dict]:
    """`currency` lags inside the block: a pending deposit two minutes old that nothing
    settles. After it, the deposit settles and the currency takes work again."""
    try:
        with settlement_held(currency):
            deposit = api.deposit(member.accounts[currency], "1.00")
            with script_session() as session, session.begin():
                session.execute(
                    text(
                        "UPDATE transfers SET created_at = created_at - interval '2 minutes' "
                        "WHERE id = :id"
                    ),
                    {"id": deposit["id"]},
                )
            _fresh(app)
            yield deposit
    finally:
        # Even after a failure: no later test may find the currency lagging.
        ring(currency)
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    _fresh(app)


def _refused(response: Any) -> None:
    assert_problem(response, 503, "service_unavailable")
    assert response.headers["Retry-After"] == str(overload.BACKLOG_RETRY_AFTER_S)


def _held_hold(api: Api, payer: Member, payee: Member, currency: str) -> dict:
    response = api.client.post(
        f"/users/{payer.id}/holds",
        data={"from": payer.accounts[currency], "to": payee.accounts[currency], "amount": "5"},
        headers=payer.auth,
    )
    assert response.status_code == 202, response.get_json()
    path = f"/users/{payer.id}/holds/{response.get_json()['id']}"
    deadline = time.monotonic() + 20
    while (hold := api.client.get(path, headers=payer.auth).get_json())["status"] == "pending":
        assert time.monotonic() < deadline, hold
        time.sleep(0.05)
    assert hold["status"] == "held", hold
    return hold


def test_work_in_a_lagging_currency_is_refused_and_nothing_created(app, api: Api) -> None:
    alice, bob = api.funded("100.00", LAGGING), api.register()
    deposit = api.deposit(alice.accounts[OTHER], "100.00")
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    paid = api.transfer(alice, alice.accounts[LAGGING], bob.accounts[LAGGING], "10.00")
    payment = api.wait_final(alice, paid.get_json()["id"])
    assert payment["status"] == "settled", payment
    hold = _held_hold(api, alice, bob, LAGGING)
    eur = {"from": alice.accounts[LAGGING], "to": bob.accounts[LAGGING], "amount": "1.00"}
    usd = {"from": alice.accounts[OTHER], "to": bob.accounts[OTHER], "amount": "1.00"}
    client, me = api.client, f"/users/{alice.id}"

    with lagging(app, api, alice) as stuck:
        before = _counts()
        _refused(api.transfer(alice, eur["from"], eur["to"], "1.00"))
        _refused(
            client.post(f"{me}/payouts", data=eur | {"destination": "X 1"}, headers=alice.auth)
        )
        _refused(client.post(f"{me}/holds", data=eur, headers=alice.auth))
        _refused(client.post(f"{me}/holds/{hold['id']}/capture", headers=alice.auth))
        _refused(client.post(f"{me}/holds/{hold['id']}/void", headers=alice.auth))
        _refused(
            client.post(f"/users/{bob.id}/transfers/{payment['id']}/refunds", headers=bob.auth)
        )
        _refused(
            client.post(
                f"/accounts/{alice.accounts[LAGGING]}/deposits",
                data={"amount": "1.00"},
                headers=SUPERUSER.auth,
            )
        )
        # A batch refuses its items of the lagging currency, each on its own.
        batch = client.post(
            f"{me}/transfers/batch", json={"transfers": [eur, usd]}, headers=alice.auth
        )
        assert batch.status_code == 202, batch.get_json()
        refused, accepted = batch.get_json()["results"]
        assert refused["status"] == 503
        assert refused["error"]["code"] == "service_unavailable"
        assert accepted["status"] == 202
        assert _counts() == (before[0] + 1, before[1])

        # Other currencies, reads and polls go on.
        other = api.transfer(alice, usd["from"], usd["to"], "1.00")
        assert other.status_code == 202, other.get_json()
        assert client.get(f"{me}/accounts", headers=alice.auth).status_code == 200
        assert client.get(f"{me}/holds/{hold['id']}", headers=alice.auth).status_code == 200
        polled = client.get(
            f"/users/{SUPERUSER.id}/transfers/{stuck['id']}?wait=0.2", headers=SUPERUSER.auth
        )
        assert polled.status_code == 200
        assert polled.get_json()["status"] == "pending"
        held = client.get(f"{me}/holds/{hold['id']}", headers=alice.auth).get_json()
        assert held["status"] == "held"
        assert held["captured_amount"] in (None, "0.00")

    # Recovered once the backlog cleared.
    again = api.transfer(alice, eur["from"], eur["to"], "1.00")
    assert again.status_code == 202, again.get_json()
    assert api.wait_final(alice, again.get_json()["id"])["status"] == "settled"


def test_an_old_transfer_on_its_retry_schedule_does_not_make_its_currency_lag(
    app, api: Api
) -> None:
    """A transfer that failed and waits for (or is due) its next attempt is old by nature,
    like one beat reopened after it failed: new work in its currency is still taken."""
    alice, bob = api.funded("10.00", LAGGING), api.register()
    with settlement_held(LAGGING):
        deposit = api.deposit(alice.accounts[LAGGING], "1.00")
        with script_session() as session, session.begin():
            session.execute(
                text(
                    "UPDATE transfers SET created_at = created_at - interval '2 minutes',"
                    " attempts = 3, next_attempt_at = now() - interval '1 second' WHERE id = :id"
                ),
                {"id": deposit["id"]},
            )
        _fresh(app)
        paid = api.transfer(alice, alice.accounts[LAGGING], bob.accounts[LAGGING], "1.00")
        assert paid.status_code == 202, paid.get_json()
    ring(LAGGING)
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    _fresh(app)


def test_unknown_and_others_targets_still_answer_404_while_lagging(app, api: Api) -> None:
    alice, bob = api.funded("10.00", LAGGING), api.register()
    with lagging(app, api, alice):
        me = f"/users/{alice.id}"
        # Another user's account of the lagging currency: as if it did not exist, as
        # ever (the bound tells no one which ids exist).
        theirs = api.transfer(bob, alice.accounts[LAGGING], bob.accounts[LAGGING], "1.00")
        assert_problem(theirs, 404, "account_not_found")
        missing = api.client.post(f"{me}/holds/999999999/void", headers=alice.auth)
        assert_problem(missing, 404, "hold_not_found")
        response = api.client.post(
            "/accounts/999999999/deposits", data={"amount": "1"}, headers=SUPERUSER.auth
        )
        assert response.status_code == 404


def test_too_many_pending_refuses_work_too(app, api: Api, settings, monkeypatch) -> None:
    alice, bob = api.funded("10.00", LAGGING), api.register()
    # At most one pending item of work in a currency, this app only.
    monkeypatch.setitem(
        app.extensions,
        overload.EXTENSION,
        overload.Backlog(settings.model_copy(update={"max_pending": 1})),
    )
    source, target = alice.accounts[LAGGING], bob.accounts[LAGGING]
    with settlement_held(LAGGING):
        first = api.transfer(alice, source, target, "1.00")
        assert first.status_code == 202, first.get_json()
        _fresh(app)
        hold = api.client.post(
            f"/users/{alice.id}/holds",
            data={"from": source, "to": target, "amount": "1"},
            headers=alice.auth,
        )
        assert hold.status_code == 202, hold.get_json()  # one pending: not more than one
        _fresh(app)
        _refused(api.transfer(alice, source, target, "1.00"))  # a transfer and a hold
    ring(LAGGING)
    assert api.wait_final(alice, first.get_json()["id"])["status"] == "settled"
    _fresh(app)
    deadline = time.monotonic() + 20
    while (again := api.transfer(alice, source, target, "1.00")).status_code == 503:
        assert time.monotonic() < deadline, "the hold never left pending"
        time.sleep(0.2)
        _fresh(app)
    assert again.status_code == 202, again.get_json()


# --- registrations per address ----------------------------------------------------------


@pytest.fixture
def few_registrations(app, settings, redis_client, monkeypatch) -> Iterator[str]:
    """Three registrations per address for this app; a fresh address, its counter
    removed after."""
    limited = settings.model_copy(update={"registrations_per_address": 3})
    monkeypatch.setitem(app.extensions, SETTINGS, limited)
    address = f"198.51.100.{secrets.randbelow(250) + 1}"
    redis_client.delete(throttle.REGISTRATIONS_PREFIX + address)
    throttle.forget_registrations()
    yield address
    redis_client.delete(throttle.REGISTRATIONS_PREFIX + address)
    throttle.forget_registrations()


def _register(app: Any, address: str, username: str | None = None) -> Any:
    client = app.test_client()
    username = username or "reg_" + secrets.token_hex(5)
    form = {"username": username, "password": "long enough " + secrets.token_hex(3)}
    return client.post("/users", data=form, environ_base={"REMOTE_ADDR": address})


def test_registrations_are_limited_per_address(app, few_registrations: str) -> None:
    for _ in range(3):
        assert _register(app, few_registrations).status_code == 201
    username = "reg_refused_" + secrets.token_hex(4)
    refused = _register(app, few_registrations, username)
    assert_problem(refused, 429, "too_many_requests")
    assert 1 <= int(refused.headers["Retry-After"]) <= 600
    with script_session() as session:
        found = session.execute(text("SELECT 1 FROM users WHERE username = :u"), {"u": username})
        assert found.first() is None
    # Another address is not concerned.
    other = f"203.0.113.{secrets.randbelow(250) + 1}"
    try:
        assert _register(app, other).status_code == 201
    finally:
        redis.Redis.from_url(app.extensions[SETTINGS].redis_url).delete(
            throttle.REGISTRATIONS_PREFIX + other
        )


def test_an_address_over_its_limit_is_refused_before_flask(
    app, few_registrations: str, redis_client
) -> None:
    for _ in range(3):
        assert _register(app, few_registrations).status_code == 201
    first = _register(app, few_registrations)
    assert_problem(first, 429, "too_many_requests")
    key = throttle.REGISTRATIONS_PREFIX + few_registrations
    counted = int(redis_client.get(key))
    client = app.test_client()
    for path in ("/users", "/users/"):
        # Before Flask: a form Flask would call invalid gets the 429, and nothing is counted.
        again = client.post(
            path,
            data="[]",
            content_type="application/json",
            headers={"X-Request-ID": "gate-test-2"},
            environ_base={"REMOTE_ADDR": few_registrations},
        )
        assert_problem(again, 429, "too_many_requests")
        assert again.get_json()["detail"] == first.get_json()["detail"]
        assert 1 <= int(again.headers["Retry-After"]) <= int(first.headers["Retry-After"])
        assert again.headers["X-Request-ID"] == "gate-test-2"
        assert again.headers["X-Content-Type-Options"] == "nosniff"
        assert int(again.headers["Content-Length"]) == len(again.data)
    assert int(redis_client.get(key)) == counted
    # Other addresses, and other routes of this one, are not concerned.
    same_address = {"REMOTE_ADDR": few_registrations}
    assert client.get("/currencies", environ_base=same_address).status_code == 200
    other = f"203.0.113.{secrets.randbelow(250) + 1}"
    try:
        assert _register(app, other).status_code == 201
    finally:
        redis_client.delete(throttle.REGISTRATIONS_PREFIX + other)


PAUSE_S = 2.0


@pytest.fixture
def one_registration_per_address(redis_client) -> Iterator[int]:
    """gunicorn (one process) allowing one registration per address, and pausing a
    refused registration's connection for PAUSE_S; its port."""
    port = free_port()
    key = throttle.REGISTRATIONS_PREFIX + "127.0.0.1"
    redis_client.delete(key)
    env = environment(
        PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=None,
        REGISTRATIONS_PER_ADDRESS="1",
        REFUSED_CONNECTION_PAUSE=str(PAUSE_S),
    )
    try:
        with serving(gunicorn_command(port, workers=1), env, port, "/currencies"):
            yield port
    finally:
        redis_client.delete(key)


def _timed(connection: http.client.HTTPConnection, method: str, path: str) -> tuple[int, float]:
    """Sends a request (a new registration for POST); its status and how long its answer took."""
    started = time.monotonic()
    if method == "POST":
        form = {"username": "paused_" + secrets.token_hex(5), "password": "long enough"}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        connection.request(method, path, body=urlencode(form), headers=headers)
    else:
        connection.request(method, path)
    response = connection.getresponse()
    response.read()
    return response.status, time.monotonic() - started


def test_a_refused_registrations_connection_is_read_again_only_after_a_pause(
    one_registration_per_address: int,
) -> None:
    port = one_registration_per_address
    flooder = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    other = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        assert _timed(flooder, "POST", "/users")[0] == 201
        # Refused by the route (counted in Redis): answered at once, then paused.
        status, took = _timed(flooder, "POST", "/users")
        assert status == 429
        assert took < PAUSE_S
        with ThreadPoolExecutor(1) as pool:
            again = pool.submit(_timed, flooder, "POST", "/users")
            time.sleep(0.2)
            # Meanwhile other connections are served: no thread waits for the pause.
            assert _timed(other, "GET", "/currencies")[0] == 200
            served_other_at = time.monotonic()
            status, took = again.result()
        # Sent at once, read after the pause: refused before Flask this time.
        assert status == 429
        assert took >= PAUSE_S - 0.5
        assert served_other_at < time.monotonic() - 0.5
        # The connection is kept alive for what the client sends next.
        assert _timed(flooder, "GET", "/currencies")[0] == 200
    finally:
        flooder.close()
        other.close()


def test_the_registration_limit_fails_open_without_redis(
    app, few_registrations: str, monkeypatch
) -> None:
    # A real client of a port nobody listens on: the failure is Redis', not a stand-in.
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    monkeypatch.setattr(throttle, "_redis", lambda: down)
    for _ in range(5):
        assert _register(app, few_registrations).status_code == 201


# --- hashing slots --------------------------------------------------------------------------


@contextlib.contextmanager
def slots_taken() -> Iterator[None]:
    """Every hashing slot of this process taken, as by as many hashes in flight."""
    slots = passwords.hashing_slots()
    taken = 0
    while slots.acquire(blocking=False):
        taken += 1
    assert taken >= 1
    try:
        yield
    finally:
        for _ in range(taken):
            slots.release()


def _busy(response: Any) -> None:
    assert_problem(response, 503, "service_unavailable")
    assert response.headers["Retry-After"] == "1"


def test_hash_bound_default_is_the_process_share_of_the_cores(settings, monkeypatch) -> None:
    monkeypatch.setattr("common.settings._cores", lambda: 8)

    def bound(**values: int) -> int:
        return int(settings.model_copy(update={"hash_concurrency": 0, **values}).hash_bound)

    assert bound(web_concurrency=8, web_threads=16) == 1
    assert bound(web_concurrency=2, web_threads=16) == 4
    assert bound(web_concurrency=16, web_threads=16) == 1
    # At most a quarter of the threads, whatever the cores.
    assert bound(web_concurrency=1, web_threads=8) == 2
    assert bound(hash_concurrency=7) == 7


def test_registrations_are_refused_before_flask_while_every_slot_is_taken(client) -> None:
    form = {"username": "gate_" + secrets.token_hex(4), "password": "long enough"}
    with slots_taken():
        for path in ("/users", "/users/"):
            refused = client.post(path, data=form, headers={"X-Request-ID": "gate-test-1"})
            _busy(refused)
            assert refused.headers["X-Request-ID"] == "gate-test-1"
            assert refused.headers["X-Content-Type-Options"] == "nosniff"
            assert int(refused.headers["Content-Length"]) == len(refused.data)
        # Refused before the body is looked at: try again later, then it is validated.
        _busy(client.post("/users", data="[]", content_type="application/json"))
        # Other routes are not gated.
        assert client.get("/currencies").status_code == 200
    assert client.post("/users", data=form).status_code == 201


def test_requests_needing_a_hash_are_refused_while_every_slot_is_taken(app, api: Api) -> None:
    regular, stranger = api.register(), api.register()
    # Only `regular` is known to the process's credential caches.
    forget_logins()
    assert passwords._cache is not None
    passwords._cache.clear()
    assert api.client.get(f"/users/{regular.id}/accounts", headers=regular.auth).status_code == 200

    with slots_taken():
        _busy(
            api.client.post(
                "/users",
                data={"username": "hash_" + secrets.token_hex(4), "password": "long enough"},
            )
        )
        _busy(api.client.get(f"/users/{stranger.id}/accounts", headers=stranger.auth))
        _busy(
            api.client.get(
                "/users/1/accounts", headers=basic_auth("nobody_" + secrets.token_hex(3), "x" * 10)
            )
        )
        # Signed-in clients whose credentials are remembered are served as ever.
        for _ in range(5):
            served = api.client.get(f"/users/{regular.id}/accounts", headers=regular.auth)
            assert served.status_code == 200

    assert (
        api.client.get(f"/users/{stranger.id}/accounts", headers=stranger.auth).status_code == 200
    )
    api.register()
