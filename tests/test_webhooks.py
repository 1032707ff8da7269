"""docs/api.md "Webhooks": the routes, and delivery by the real delivery worker (a
`./run.sh webhooks` process) to a real receiver on loopback that verifies every request
with standardwebhooks' Webhook.verify, as a receiver would.

Knobs (tests/conftest.py): attempts time out after 2 s, retries wait 0.2 s doubling up
to 1 s, a lease lasts 4 s. The sweep runs in this process (`sweeper`) every 0.3 s, or in
a real beat process where that is what is tested.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update

from common import broker
from common.db import script_session, settlement_transaction
from common.models import Event, WebhookAttempt, WebhookDelivery
from common.webhooks import (
    MAX_WEBHOOKS_PER_USER,
    AttemptResult,
    claim_delivery,
    post_event,
    record_attempt,
    sweep_deliveries,
)
from tests.conftest import SUPERUSER, Member, assert_problem, basic_auth, read_all_pages
from tests.webhook_receiver import Answer, Receiver, event_ids

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
WEBHOOK_FIELDS = {"id", "url", "events", "enabled", "created_at"}
ATTEMPT_FIELDS = {"event_id", "attempt", "status_code", "error", "at", "next_attempt_at", "state"}
MISSING_ID = 2**62


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture
def sweeper(webhook_worker) -> Iterator[None]:
    """Beat's webhook sweep, every 0.3 s, from this process (publishing to the real Redis)."""
    from worker.webhooks import sweep_webhooks  # noqa: PLC0415 - a worker module, loaded late

    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(0.3):
            # Redis flushed mid-test: the next round sweeps again.
            with contextlib.suppress(Exception):
                sweep_webhooks()

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)


_paths = iter(range(1, 10**6))


def register_webhook(
    api, member: Member, receiver: Receiver, events: list[str] | None = None
) -> dict[str, Any]:
    """A webhook of `member` pointing at its own path of the receiver, which learns its secret."""
    path = f"/hook/{next(_paths)}"
    body: dict[str, Any] = {"url": receiver.url(path)}
    if events is not None:
        body["events"] = events
    response = api.client.post(f"/users/{member.id}/webhooks", json=body, headers=member.auth)
    assert response.status_code == 201, response.get_json()
    webhook = response.get_json()
    receiver.secrets[path] = webhook["secret"]
    webhook["path"] = path
    return webhook


def event_of(transfer_id: int, user_id: int, event_type: str) -> str:
    with script_session() as session:
        return str(
            session.scalars(
                select(Event.id).where(
                    Event.transfer_id == transfer_id,
                    Event.user_id == user_id,
                    Event.type == event_type,
                )
            ).one()
        )


@pytest.fixture
def payer(api) -> tuple[Member, Callable[[], str]]:
    """A funded member, and `pay()`: a transfer of theirs to another member that settles
    (settlement writes its events and deliveries, and publishes them); returns the id of
    the payer's `transfer.settled` event."""
    member = api.funded("100.00", "USD")
    payee = api.register()

    def pay() -> str:
        response = api.transfer(member, member.accounts["USD"], payee.accounts["USD"], "0.01")
        assert response.status_code == 202, response.get_json()
        transfer = api.wait_final(member, response.get_json()["id"])
        assert transfer["status"] == "settled", transfer
        return event_of(transfer["id"], member.id, "transfer.settled")

    return member, pay


def deliveries(api, member: Member, webhook: dict[str, Any], **query: Any) -> list[dict]:
    response = api.client.get(
        f"/users/{member.id}/webhooks/{webhook['id']}/deliveries",
        query_string=query,
        headers=member.auth,
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def delivery_row(event_id: str, webhook: dict[str, Any]) -> WebhookDelivery:
    with script_session() as session:
        return session.scalars(
            select(WebhookDelivery).where(
                WebhookDelivery.event_id == int(event_id),
                WebhookDelivery.webhook_id == webhook["id"],
            )
        ).one()


def wait_state(event_id: str, webhook: dict[str, Any], state: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while delivery_row(event_id, webhook).state != state:
        assert time.monotonic() < deadline, f"delivery still {delivery_row(event_id, webhook)}"
        time.sleep(0.1)


# --- POST /users/{id}/webhooks ---------------------------------------------------------


def test_create_shows_the_secret_once(api) -> None:
    member = api.register()
    response = api.client.post(
        f"/users/{member.id}/webhooks",
        json={"url": "https://example.com/remit?x=1"},
        headers=member.auth,
    )
    assert response.status_code == 201
    body = response.get_json()
    assert list(body) == ["id", "url", "events", "secret", "enabled", "created_at"]
    assert body["url"] == "https://example.com/remit?x=1"
    assert body["events"] == ["*"]
    assert body["enabled"] is True
    assert RFC3339_UTC.match(body["created_at"])
    assert response.headers["Location"] == f"/users/{member.id}/webhooks/{body['id']}"
    assert body["secret"].startswith("whsec_")
    assert len(base64.b64decode(body["secret"].removeprefix("whsec_"), validate=True)) >= 24
    listed = api.client.get(f"/users/{member.id}/webhooks", headers=member.auth).get_json()
    assert listed == [{k: v for k, v in body.items() if k != "secret"}]
    assert body["secret"] not in json.dumps(listed)


def test_create_from_a_form_with_comma_separated_events(api) -> None:
    member = api.register()
    response = api.client.post(
        f"/users/{member.id}/webhooks",
        data={"url": "http://127.0.0.1:9/x", "events": "transfer.received, transfer.settled"},
        headers=member.auth,
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["events"] == ["transfer.received", "transfer.settled"]


def test_each_webhook_has_its_own_secret(api) -> None:
    member = api.register()
    secrets = {
        api.client.post(
            f"/users/{member.id}/webhooks", json={"url": "http://127.0.0.1:9/"}, headers=member.auth
        ).get_json()["secret"]
        for _ in range(3)
    }
    assert len(secrets) == 3


def test_at_most_ten_webhooks_even_when_created_at_once(app, api) -> None:
    member = api.register()

    def create(_: int) -> int:
        return (
            app.test_client()
            .post(
                f"/users/{member.id}/webhooks",
                json={"url": "http://127.0.0.1:9/"},
                headers=member.auth,
            )
            .status_code
        )

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(create, range(MAX_WEBHOOKS_PER_USER + 4)))
    assert statuses.count(201) == MAX_WEBHOOKS_PER_USER
    assert statuses.count(409) == 4
    response = api.client.post(
        f"/users/{member.id}/webhooks", json={"url": "http://127.0.0.1:9/"}, headers=member.auth
    )
    assert_problem(response, 409, "webhook_limit")
    # A deleted one frees its place.
    first = api.client.get(f"/users/{member.id}/webhooks", headers=member.auth).get_json()[0]
    api.client.delete(f"/users/{member.id}/webhooks/{first['id']}", headers=member.auth)
    response = api.client.post(
        f"/users/{member.id}/webhooks", json={"url": "http://127.0.0.1:9/"}, headers=member.auth
    )
    assert response.status_code == 201


BAD_URLS = [
    "",
    "example.com/hook",
    "/relative",
    "ftp://example.com/",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "http://",
    "http:///path",
    "http://user:pw@example.com/",
    "http://exa mple.com/",
    "http://example.com/\u00e9",
    "http://ex\u00e4mple.com/",
    "http://example.com:99999/",
    "http://example.com:0/",
    "http://[::1/",
    "http://-bad-.example/\x00",
    "http://" + "a" * 64 + ".com/",
    "https://example.com/" + "x" * 2100,
    "http://10.0.0.1/",  # private: refused in every environment
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://0.0.0.0:8000/",
    "http://224.0.0.1/",
]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "form"])
def test_bad_urls(api, url: str, as_json: bool) -> None:
    member = api.register()
    kwargs: dict[str, Any] = {"json": {"url": url}} if as_json else {"data": {"url": url}}
    response = api.client.post(f"/users/{member.id}/webhooks", headers=member.auth, **kwargs)
    assert_problem(response, 400, "invalid_url")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "invalid_url"),
        ({"url": None}, "invalid_url"),
        ({"url": 5}, "invalid_url"),
        ({"url": ["http://127.0.0.1/"]}, "invalid_url"),
        ({"url": "http://127.0.0.1/", "events": []}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": ["nope"]}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": ["*", "transfer.settled"]}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": [["transfer.settled"]]}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": [None]}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": {"a": 1}}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": 7}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": ["transfer.settled"] * 1000}, "invalid_request"),
        ({"url": "http://127.0.0.1/", "events": "\x00"}, "invalid_request"),
    ],
)
def test_bad_fields(api, body: dict[str, Any], code: str) -> None:
    member = api.register()
    response = api.client.post(f"/users/{member.id}/webhooks", json=body, headers=member.auth)
    assert_problem(response, 400, code)


def test_repeated_event_types_are_kept_once(api) -> None:
    member = api.register()
    response = api.client.post(
        f"/users/{member.id}/webhooks",
        json={"url": "http://127.0.0.1:9/", "events": ["transfer.failed", "transfer.failed"]},
        headers=member.auth,
    )
    assert response.get_json()["events"] == ["transfer.failed"]


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_request"),
        (b"[1, 2]", "application/json", 400, "invalid_request"),
        (b'"http://127.0.0.1/"', "application/json", 400, "invalid_request"),
        (b"url=http://127.0.0.1/", "text/plain", 415, "unsupported_media_type"),
        (b"\xff\xfe", "application/json", 400, "invalid_request"),
        (b"x" * (1024 * 1024 + 1), "application/json", 413, "payload_too_large"),
    ],
)
def test_bad_bodies(api, data: bytes, content_type: str, status: int, code: str) -> None:
    member = api.register()
    response = api.client.post(
        f"/users/{member.id}/webhooks",
        data=data,
        headers={**member.auth, "Content-Type": content_type},
    )
    assert_problem(response, status, code)


# --- production: the SSRF rule ----------------------------------------------------------


@pytest.fixture(scope="module")
def production_client(settings, database):
    from web.app import create_app  # noqa: PLC0415

    app = create_app(settings.model_copy(update={"environment": "production"}))
    return app.test_client()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/",
        "http://127.1.2.3/",
        "http://localhost/hook",
        "http://LOCALHOST./hook",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:10.1.1.1]/",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://169.254.169.254/",
        "http://[fd00::1]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://224.0.0.251/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
    ],
)
def test_production_refuses_internal_addresses(api, production_client, url: str) -> None:
    member = api.register()
    response = production_client.post(
        f"/users/{member.id}/webhooks", json={"url": url}, headers=member.auth
    )
    assert_problem(response, 400, "invalid_url")


def test_production_accepts_a_public_address(api, production_client) -> None:
    # Only stored: no event of this member is ever delivered anywhere.
    member = api.register()
    response = production_client.post(
        f"/users/{member.id}/webhooks", json={"url": "https://8.8.8.8/hook"}, headers=member.auth
    )
    assert response.status_code == 201, response.get_json()


def test_development_and_test_allow_loopback(api) -> None:
    member = api.register()
    for url in ("http://127.0.0.1:1/", "http://localhost:1/", "http://[::1]:1/"):
        response = api.client.post(
            f"/users/{member.id}/webhooks", json={"url": url}, headers=member.auth
        )
        assert response.status_code == 201, (url, response.get_json())


def test_delivery_checks_the_address_again(receiver: Receiver) -> None:
    # What a production worker does when a name resolves to loopback at delivery time
    # (DNS rebinding): no connection at all. The receiver sees nothing.
    path = "/rebinding"
    for url in (receiver.url(path), f"http://localhost:{receiver.port}{path}"):
        result = post_event(url, "whsec_" + "A" * 32, "1", "{}", timeout=2, allow_loopback=False)
        assert result.status_code is None
        assert "forbidden address" in (result.error or "")
    assert receiver.requests_to(path) == []


# --- auth and path rules -------------------------------------------------------------------


def _routes(member_id: int, webhook_id: int) -> list[tuple[str, str]]:
    base = f"/users/{member_id}/webhooks"
    return [
        ("POST", base),
        ("GET", base),
        ("DELETE", f"{base}/{webhook_id}"),
        ("GET", f"{base}/{webhook_id}/deliveries"),
    ]


@pytest.fixture
def owned(api) -> tuple[Member, int]:
    member = api.register()
    response = api.client.post(
        f"/users/{member.id}/webhooks", json={"url": "http://127.0.0.1:9/"}, headers=member.auth
    )
    return member, response.get_json()["id"]


@pytest.mark.parametrize("route", range(4), ids=["create", "list", "delete", "deliveries"])
def test_every_route_needs_credentials(api, owned, route: int) -> None:
    member, webhook_id = owned
    method, path = _routes(member.id, webhook_id)[route]
    response = api.client.open(path, method=method, json={"url": "http://127.0.0.1:9/"})
    body = assert_problem(response, 401, "unauthorized")
    assert "Basic" in response.headers["WWW-Authenticate"], body
    wrong = basic_auth(member.username, "wrong password")
    response = api.client.open(path, method=method, headers=wrong, json={})
    assert_problem(response, 401, "unauthorized")


@pytest.mark.parametrize("route", range(4), ids=["create", "list", "delete", "deliveries"])
def test_another_user_is_forbidden(api, owned, route: int) -> None:
    member, webhook_id = owned
    other = api.register()
    method, path = _routes(member.id, webhook_id)[route]
    response = api.client.open(
        path, method=method, headers=other.auth, json={"url": "http://127.0.0.1:9/"}
    )
    assert_problem(response, 403, "forbidden")


@pytest.mark.parametrize("route", range(4), ids=["create", "list", "delete", "deliveries"])
def test_a_bearer_token_is_not_password_auth(api, owned, route: int) -> None:
    member, webhook_id = owned
    method, path = _routes(member.id, webhook_id)[route]
    response = api.client.open(
        path, method=method, headers={"Authorization": "Bearer rk_" + "x" * 40}, json={}
    )
    assert response.status_code in (401, 403)
    assert response.mimetype == "application/problem+json"


def test_the_superuser_reads_but_does_not_manage(api, owned) -> None:
    member, webhook_id = owned
    base = f"/users/{member.id}/webhooks"
    listed = api.client.get(base, headers=SUPERUSER.auth)
    assert listed.status_code == 200
    assert [w["id"] for w in listed.get_json()] == [webhook_id]
    assert "secret" not in listed.get_json()[0]
    assert (
        api.client.get(f"{base}/{webhook_id}/deliveries", headers=SUPERUSER.auth).status_code == 200
    )
    response = api.client.post(base, json={"url": "http://127.0.0.1:9/"}, headers=SUPERUSER.auth)
    assert_problem(response, 403, "forbidden")
    assert_problem(
        api.client.delete(f"{base}/{webhook_id}", headers=SUPERUSER.auth), 403, "forbidden"
    )
    response = api.client.get(f"/users/{MISSING_ID}/webhooks", headers=SUPERUSER.auth)
    assert_problem(response, 404, "user_not_found")


def test_the_superuser_manages_its_own_webhooks(api) -> None:
    """Its deposits' events are its own, as its keys are (it moves money only by deposits,
    but a webhook moves none)."""
    base = f"/users/{SUPERUSER.id}/webhooks"
    response = api.client.post(base, json={"url": "http://127.0.0.1:9/"}, headers=SUPERUSER.auth)
    assert response.status_code == 201
    webhook_id = response.get_json()["id"]
    # Other tests (the contract fuzzer among them) may have left the superuser's own.
    listed = api.client.get(base, headers=SUPERUSER.auth).get_json()
    assert webhook_id in [webhook["id"] for webhook in listed]
    assert api.client.delete(f"{base}/{webhook_id}", headers=SUPERUSER.auth).status_code == 204
    listed = api.client.get(base, headers=SUPERUSER.auth).get_json()
    assert webhook_id not in [webhook["id"] for webhook in listed]


# --- DELETE and GET .../deliveries ------------------------------------------------------


def test_delete(api, owned) -> None:
    member, webhook_id = owned
    path = f"/users/{member.id}/webhooks/{webhook_id}"
    listed = api.client.get(f"/users/{member.id}/webhooks", headers=member.auth).get_json()
    # What the creation's Location names: the webhook as listed, never its secret.
    assert api.client.get(path, headers=member.auth).get_json() == listed[0]
    response = api.client.delete(path, headers=member.auth)
    assert response.status_code == 204
    assert response.get_data() == b""
    assert api.client.get(f"/users/{member.id}/webhooks", headers=member.auth).get_json() == []
    assert_problem(api.client.delete(path, headers=member.auth), 404, "webhook_not_found")
    assert_problem(api.client.get(path, headers=member.auth), 404, "webhook_not_found")
    response = api.client.get(f"{path}/deliveries", headers=member.auth)
    assert_problem(response, 404, "webhook_not_found")


def test_unknown_and_foreign_webhooks_are_not_found(api, owned) -> None:
    member, webhook_id = owned
    other = api.register()
    for path in (
        f"/users/{other.id}/webhooks/{webhook_id}",
        f"/users/{other.id}/webhooks/{MISSING_ID}",
    ):
        assert_problem(api.client.delete(path, headers=other.auth), 404, "webhook_not_found")
        assert_problem(api.client.get(path, headers=other.auth), 404, "webhook_not_found")
        response = api.client.get(f"{path}/deliveries", headers=other.auth)
        assert_problem(response, 404, "webhook_not_found")
    # An id past BIGINT is no route at all.
    response = api.client.delete(f"/users/{member.id}/webhooks/{2**64}", headers=member.auth)
    assert_problem(response, 404, "not_found")


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"limit": "1e2"},
        {"cursor": "not-a-cursor"},
        {"cursor": base64.urlsafe_b64encode(b"asc:5").decode()},
        {"cursor": base64.urlsafe_b64encode(f"dsc:{2**64}".encode()).decode()},
        {"cursor": "x" * 300},
    ],
)
def test_bad_deliveries_query(api, owned, query: dict[str, str]) -> None:
    member, webhook_id = owned
    response = api.client.get(
        f"/users/{member.id}/webhooks/{webhook_id}/deliveries",
        query_string=query,
        headers=member.auth,
    )
    assert_problem(response, 400, "invalid_query")


def _event_and_delivery(user_id: int, webhook_id: int, **delivery: Any) -> tuple[int, int]:
    """An event of `user_id` and its delivery to `webhook_id`, written by hand."""
    with script_session() as session, session.begin():
        event_id = session.execute(
            insert(Event)
            .values(user_id=user_id, type="transfer.settled", transfer_id=0)
            .returning(Event.id)
        ).scalar_one()
        values = {"webhook_id": webhook_id, "event_id": event_id, **delivery}
        delivery_id = session.execute(
            insert(WebhookDelivery).values(**values).returning(WebhookDelivery.id)
        ).scalar_one()
    return event_id, delivery_id


def test_deliveries_are_paged_newest_first(api, owned) -> None:
    member, webhook_id = owned
    event_id, delivery_id = _event_and_delivery(
        member.id, webhook_id, state="failed", deadline_at=func.now()
    )
    with script_session() as session, session.begin():
        for attempt in range(1, 8):
            session.execute(
                insert(WebhookAttempt).values(
                    delivery_id=delivery_id,
                    webhook_id=webhook_id,
                    event_id=event_id,
                    attempt=attempt,
                    status_code=500,
                    state="retrying",
                    next_attempt_at=func.now(),
                )
            )
    path = f"/users/{member.id}/webhooks/{webhook_id}/deliveries?limit=3"
    items, pages = read_all_pages(api.client, path, member.auth)
    assert pages == 3
    assert [item["attempt"] for item in items] == [7, 6, 5, 4, 3, 2, 1]
    assert all(set(item) == ATTEMPT_FIELDS for item in items)
    assert items[0]["event_id"] == str(event_id)
    assert items[0]["status_code"] == 500
    assert items[0]["error"] is None
    assert RFC3339_UTC.match(items[0]["at"])
    assert RFC3339_UTC.match(items[0]["next_attempt_at"])


# --- delivery ---------------------------------------------------------------------------


def test_an_event_is_delivered_signed(api, payer, receiver, webhook_worker) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    event_id = pay()
    [event] = receiver.wait_for(lambda: receiver.events_at(webhook["path"]))
    [request] = receiver.requests_to(webhook["path"])
    assert request.headers["webhook-id"] == event_id
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", request.headers["webhook-signature"])
    assert event["id"] == event_id
    assert event["type"] == "transfer.settled"
    assert RFC3339_UTC.match(event["created_at"])
    # The transfer exactly as its GET shows it.
    assert event["data"] == api.get_transfer(member, event["data"]["id"])
    assert event["data"]["status"] == "settled"
    wait_state(event_id, webhook, "delivered")
    [attempt] = deliveries(api, member, webhook)
    assert attempt["event_id"] == event_id
    assert attempt["attempt"] == 1
    assert attempt["status_code"] == 204
    assert attempt["error"] is None
    assert attempt["next_attempt_at"] is None
    assert attempt["state"] == "delivered"


def test_a_message_delivered_twice_makes_one_attempt(api, payer, receiver, webhook_worker) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    event_id = pay()
    wait_state(event_id, webhook, "delivered")
    delivery = delivery_row(event_id, webhook)
    for _ in range(3):
        broker.send_task(broker.DELIVER, [delivery.id], queue=broker.WEBHOOKS_QUEUE)
        broker.send_task(
            broker.DELIVER, [delivery.id, "2026-01-01T00:00:00+00:00"], queue=broker.WEBHOOKS_QUEUE
        )
    time.sleep(1.5)
    assert len(receiver.requests_to(webhook["path"])) == 1
    assert len(deliveries(api, member, webhook)) == 1


def test_only_matching_webhooks_get_an_event(api, receiver, webhook_worker) -> None:
    payer, payee = api.funded("5.00", "USD"), api.register()
    everything = register_webhook(api, payer, receiver)
    settled_only = register_webhook(api, payer, receiver, ["transfer.settled"])
    rejected_only = register_webhook(api, payer, receiver, ["transfer.rejected"])
    received_only = register_webhook(api, payer, receiver, ["transfer.received"])
    payee_hook = register_webhook(api, payee, receiver, ["transfer.received"])
    paid = api.transfer(payer, payer.accounts["USD"], payee.accounts["USD"], "1.00").get_json()
    refused = api.transfer(payer, payer.accounts["USD"], payee.accounts["USD"], "9.00").get_json()
    assert api.wait_final(payer, paid["id"])["status"] == "settled"
    assert api.wait_final(payer, refused["id"])["status"] == "rejected"
    settled = event_of(paid["id"], payer.id, "transfer.settled")
    rejected = event_of(refused["id"], payer.id, "transfer.rejected")
    received = event_of(paid["id"], payee.id, "transfer.received")
    expected = {
        everything["path"]: {settled, rejected},
        settled_only["path"]: {settled},
        rejected_only["path"]: {rejected},
        payee_hook["path"]: {received},
    }
    for path, ids in expected.items():
        receiver.wait_for(lambda path=path, ids=ids: event_ids(receiver.events_at(path)) == ids)
    types = {e["id"]: e["type"] for e in receiver.events_at(everything["path"])}
    assert types == {settled: "transfer.settled", rejected: "transfer.rejected"}
    [received_event] = receiver.events_at(payee_hook["path"])
    assert received_event["data"]["to_user_id"] == payee.id
    time.sleep(0.5)
    assert receiver.requests_to(received_only["path"]) == []
    assert deliveries(api, payer, received_only) == []


def test_retries_after_server_errors(api, payer, receiver, webhook_worker, sweeper) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    receiver.script[webhook["path"]] = [Answer(500), Answer(503), Answer(500)]
    event_id = pay()
    receiver.wait_for(lambda: len(receiver.requests_to(webhook["path"])) >= 4)
    wait_state(event_id, webhook, "delivered")
    attempts = deliveries(api, member, webhook)
    assert [a["attempt"] for a in attempts] == [4, 3, 2, 1]
    assert [a["status_code"] for a in attempts] == [204, 500, 503, 500]
    assert [a["state"] for a in attempts] == ["delivered", "retrying", "retrying", "retrying"]
    assert attempts[0]["next_attempt_at"] is None
    assert all(a["next_attempt_at"] is not None for a in attempts[1:])
    # Every request of the retries is the same event, signed anew, each verified.
    events = receiver.events_at(webhook["path"])
    assert {e["id"] for e in events} == {event_id}
    # Backoff: 0.2 s, then 0.4 s, then 0.8 s, each less up to a fifth (plus sweep delay).
    times = [r.at for r in receiver.requests_to(webhook["path"])]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert [gap >= least for gap, least in zip(gaps, (0.16, 0.32, 0.64), strict=True)] == [
        True
    ] * 3, gaps


def test_redirects_are_not_followed(api, payer, receiver, webhook_worker, sweeper) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    elsewhere = webhook["path"] + "/elsewhere"
    receiver.script[webhook["path"]] = [Answer(302, headers={"Location": elsewhere})]
    event_id = pay()
    wait_state(event_id, webhook, "delivered")
    attempts = deliveries(api, member, webhook)
    assert [(a["status_code"], a["error"], a["state"]) for a in attempts] == [
        (204, None, "delivered"),
        (302, "redirect not followed", "retrying"),
    ]
    assert receiver.requests_to(elsewhere) == []


def test_a_slow_receiver_times_out_and_is_retried(
    api, payer, receiver, webhook_worker, sweeper
) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    receiver.script[webhook["path"]] = [Answer(200, delay=3.5)]
    event_id = pay()
    wait_state(event_id, webhook, "delivered", timeout=30)
    attempts = deliveries(api, member, webhook)
    assert [(a["status_code"], a["state"]) for a in attempts] == [
        (204, "delivered"),
        (None, "retrying"),
    ]
    assert attempts[1]["error"] == "no answer within 2 s"


def test_a_receiver_down_for_a_while_gets_everything_after(
    api, payer, webhook_worker, sweeper
) -> None:
    member, pay = payer
    down = Receiver()
    try:
        webhook = register_webhook(api, member, down)
        port = down.port
        down.stop()
        events = [pay() for _ in range(5)]

        def failures() -> int:
            with script_session() as session:
                return (
                    session.scalar(
                        select(func.count()).where(WebhookAttempt.webhook_id == webhook["id"])
                    )
                    or 0
                )

        deadline = time.monotonic() + 20
        while failures() < 10:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        attempts = deliveries(api, member, webhook)
        assert {a["error"] for a in attempts} == {"connection refused"}
        assert {a["state"] for a in attempts} == {"retrying"}
        back = Receiver(port)
        back.secrets = down.secrets
        try:
            back.wait_for(
                lambda: event_ids(back.events_at(webhook["path"])) == set(events), timeout=30
            )
            for event_id in events:
                wait_state(event_id, webhook, "delivered")
        finally:
            back.stop()
    finally:
        down.stop()


def test_deleting_a_webhook_stops_its_deliveries(
    api, payer, receiver, webhook_worker, sweeper
) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    receiver.script[webhook["path"]] = [Answer(500)] * 1000
    event_id = pay()
    receiver.wait_for(lambda: len(receiver.requests_to(webhook["path"])) >= 2)
    response = api.client.delete(
        f"/users/{member.id}/webhooks/{webhook['id']}", headers=member.auth
    )
    assert response.status_code == 204
    time.sleep(0.5)  # an attempt that was in flight ends
    seen = len(receiver.requests_to(webhook["path"]))
    assert delivery_row(event_id, webhook).state == "failed"
    pay()  # no delivery row: the webhook is no longer enabled
    time.sleep(1.5)
    assert len(receiver.requests_to(webhook["path"])) == seen
    receiver.script.pop(webhook["path"])


def test_past_its_deadline_a_delivery_fails(api, payer, receiver, webhook_worker, sweeper) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    receiver.script[webhook["path"]] = [Answer(500)] * 1000
    event_id = pay()
    receiver.wait_for(lambda: len(receiver.requests_to(webhook["path"])) >= 1)
    with script_session() as session, session.begin():
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.event_id == int(event_id))
            .values(deadline_at=func.now() + text("interval '1.5 seconds'"))
        )
    wait_state(event_id, webhook, "failed")
    time.sleep(0.5)
    attempts = deliveries(api, member, webhook)
    assert attempts[0]["state"] in ("failed", "retrying")
    assert all(a["status_code"] == 500 for a in attempts)
    count = len(receiver.requests_to(webhook["path"]))
    time.sleep(1)
    assert len(receiver.requests_to(webhook["path"])) == count
    receiver.script.pop(webhook["path"])


def test_a_worker_killed_mid_delivery_loses_nothing(
    api, payer, receiver, webhook_worker, sweeper
) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    # The first request is answered slowly: the worker is killed while it waits.
    receiver.script[webhook["path"]] = [Answer(204, delay=1.5)]
    event_id = pay()
    receiver.wait_for(lambda: receiver.requests_to(webhook["path"]))
    webhook_worker.kill()
    try:
        assert delivery_row(event_id, webhook).state == "pending"
        assert deliveries(api, member, webhook) == []
    finally:
        webhook_worker.start()
    # Its lease (4 s) runs out; the sweep hands the delivery to the new worker.
    receiver.wait_for(lambda: len(receiver.requests_to(webhook["path"])) >= 2, timeout=30)
    wait_state(event_id, webhook, "delivered")
    assert event_ids(receiver.events_at(webhook["path"])) == {event_id}
    [attempt] = deliveries(api, member, webhook)
    assert attempt["state"] == "delivered"


def test_deliveries_survive_a_flushed_redis(
    api, payer, receiver, webhook_worker, redis_client
) -> None:
    member, pay = payer
    webhook = register_webhook(api, member, receiver)
    webhook_worker.stop()
    try:
        events = [pay() for _ in range(3)]
        redis_client.flushdb()
    finally:
        from tests.conftest import CLAIM, CLAIM_KEY  # noqa: PLC0415

        redis_client.set(CLAIM_KEY, CLAIM, ex=2 * 3600)
        webhook_worker.start()
    time.sleep(1)
    assert receiver.requests_to(webhook["path"]) == []
    # Nothing is in Redis any more: the real beat's sweep finds them in the database.
    from ops import services  # noqa: PLC0415
    from ops.supervisor import Process  # noqa: PLC0415

    folder = webhook_worker.log_path.parent
    beat = Process(
        "beat", services.command("beat", schedule=folder / "beat"), log=folder / "beat.log"
    )
    beat.start()
    try:
        receiver.wait_for(
            lambda: event_ids(receiver.events_at(webhook["path"])) == set(events), timeout=40
        )
    finally:
        beat.stop(10)


@pytest.mark.usefixtures("sweeper")
def test_secrets_are_never_logged(api, payer, receiver, webhook_worker, caplog) -> None:
    member, pay = payer
    with caplog.at_level("DEBUG"):
        webhook = register_webhook(api, member, receiver)
        receiver.script[webhook["path"]] = [Answer(500)]
        event_id = pay()
        wait_state(event_id, webhook, "delivered", timeout=30)
    secret = webhook["secret"]
    key = secret.removeprefix("whsec_")
    signatures = [r.headers["webhook-signature"] for r in receiver.requests_to(webhook["path"])]
    logs = webhook_worker.log() + caplog.text
    assert "webhook delivery" in webhook_worker.log()
    for needle in (secret, key, key[:20], *signatures, *(s[3:23] for s in signatures)):
        assert needle not in logs


def test_the_delivery_worker_is_on_its_own_queue(webhook_worker) -> None:
    inspect = webhook_worker.celery_app.control.inspect(
        destination=[webhook_worker.name], timeout=2
    )
    queues = inspect.active_queues() or {}
    assert [q["name"] for q in queues[webhook_worker.name]] == [broker.WEBHOOKS_QUEUE]
    stats = inspect.stats() or {}
    pool = stats[webhook_worker.name]["pool"]
    assert pool["implementation"] == "celery.concurrency.thread:TaskPool"
    assert pool["max-concurrency"] == 8  # WEBHOOK_CONCURRENCY
    registered = (inspect.registered() or {})[webhook_worker.name]
    assert broker.DELIVER in registered
    assert broker.SWEEP_WEBHOOKS in registered


def test_a_lease_is_handed_out_once_and_claimed_by_its_token(api, payer, receiver) -> None:
    # common.webhooks directly, no worker involved: sweep twice, claim with each token.
    member, _ = payer
    webhook = register_webhook(api, member, receiver)
    event_id, delivery_id = _event_and_delivery(
        member.id,
        webhook["id"],
        deadline_at=func.now() + text("interval '1 day'"),
        next_attempt_at=func.now() + text("interval '1 hour'"),
    )

    def sweep() -> dict[int, Any]:
        _, leased = settlement_transaction(lambda s: sweep_deliveries(s, 30))
        return dict(leased)

    def claim(token: Any) -> Any:
        return settlement_transaction(lambda s: claim_delivery(s, delivery_id, token, 30))

    assert delivery_id not in sweep()  # not due yet
    assert claim(None) is None
    with script_session() as session, session.begin():
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(next_attempt_at=func.now())
        )
    token = sweep()[delivery_id]
    assert delivery_id not in sweep()  # leased to its message: not published again
    assert claim(None) is None  # an earlier message without the token
    assert claim(token - timedelta(microseconds=1)) is None  # an older sweep's message
    held = claim(token)
    assert held is not None
    assert held.url == webhook["url"]
    assert held.secret == webhook["secret"]
    assert held.attempts == 0
    assert claim(token) is None  # the same message again: the worker's lease now
    # The attempt is recorded as any: a failure, due again after the delay.
    result = AttemptResult(None, "connection refused")
    row = settlement_transaction(lambda s: record_attempt(s, held, result, 60))
    assert (row.attempt, row.state, row.error) == (1, "retrying", "connection refused")
    assert delivery_row(str(event_id), webhook).state == "pending"
    assert delivery_id not in sweep()  # due in a minute
    with script_session() as session, session.begin():
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(state="failed")
        )
