"""Webhooks: their secrets, the URL rules (SSRF), signing, backoff, one delivery attempt,
and the rows that manage them (docs/api.md "Webhooks", docs/decisions/0033).

A delivery is one event to one webhook (`webhook_deliveries`, written with the event).
Its schedule lives in the database: `next_attempt_at` says when it is due, and
`locked_until` is a lease that says who has it meanwhile, either a message on the
broker (the sweep's lease, whose value the message carries as its token) or a worker
making the attempt. A lease that runs out (lost message, killed worker) lets the sweep
hand the delivery out again: at least once, never lost.

The attempt connects to an address that was checked against the rules here, the one
resolved for this attempt, so a name that resolves elsewhere later (DNS rebinding)
cannot point a delivery at a forbidden address.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import random
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import false, func, or_, select, true, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook as Signer

from common.errors import Conflict, Invalid, NotFound
from common.limits import WEBHOOK_URL_MAX_LENGTH
from common.models import (
    DeliveryState,
    EventType,
    User,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
)

MAX_WEBHOOKS_PER_USER = 10
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
# Random bytes of a secret; the Standard Webhooks specification asks for 24 to 64.
SECRET_BYTES = 32
ALL_EVENTS = "*"
EVENT_TYPES = frozenset(event_type.value for event_type in EventType)
USER_AGENT = "Remit-Webhooks/1"
# A creation-time name lookup holds a web thread; it gets no longer than this.
CREATION_LOOKUP_TIMEOUT_S = 5.0
# Due deliveries one sweep hands out at most (the next sweep takes the rest).
SWEEP_BATCH = 5000

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidUrl(Invalid):
    def __init__(self, detail: str) -> None:
        super().__init__("invalid_url", f"url: {detail}")


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256>` over "{id}.{timestamp}.{body}", keyed by the secret's
    bytes (after whsec_): the Standard Webhooks scheme, by its maintained library."""
    return Signer(secret).sign(message_id, datetime.fromtimestamp(timestamp, UTC), body)


def event_filter(value: object) -> list[str]:
    """The `events` of a webhook: known types without repeats, or ["*"] alone. Takes a
    list, or a comma-separated string (a form field). ValueError says what is wrong."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list) or not value:
        raise ValueError('must be a non-empty list of event types, or ["*"]')
    if len(value) > len(EVENT_TYPES) + 1 or not all(isinstance(item, str) for item in value):
        raise ValueError("must list event types as strings, each once")
    unknown = [item for item in value if item not in EVENT_TYPES and item != ALL_EVENTS]
    if unknown:
        raise ValueError(f"unknown event type {unknown[0][:50]!r}")
    chosen = list(dict.fromkeys(value))
    if ALL_EVENTS in chosen and len(chosen) > 1:
        raise ValueError('"*" already means every type: send it alone')
    return chosen


# --- URLs and the addresses they may reach ---------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a webhook URL points: what a request needs to reach it."""

    https: bool
    host: str  # lower case, IPv6 literals without brackets
    port: int
    path: str  # path and query, as sent in the request line


# RFC 3986's characters: anything else (spaces, controls, non-ASCII) must be percent-encoded.
_URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?")


def parse_url(url: str) -> Target:
    """The target of an absolute http(s) URL; InvalidUrl says what is wrong."""
    if len(url) > WEBHOOK_URL_MAX_LENGTH:
        raise InvalidUrl(f"at most {WEBHOOK_URL_MAX_LENGTH} characters")
    if not _URL_CHARACTERS.fullmatch(url):
        raise InvalidUrl("ASCII URL characters only (percent-encode the rest)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidUrl("not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidUrl("must be an absolute http:// or https:// URL")
    host = parts.hostname or ""
    if not host:
        raise InvalidUrl("has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidUrl("must not carry credentials (use the signature to authenticate us)")
    if not (_literal_address(host) or (len(host) <= 253 and _HOST_NAME.fullmatch(host))):
        raise InvalidUrl("has no valid host name")
    if port == 0:
        raise InvalidUrl("port 0 is not a port")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    https = scheme == "https"
    return Target(https, host, port or (443 if https else 80), path)


def _literal_address(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def address_allowed(address: IpAddress, *, allow_loopback: bool) -> bool:
    """Whether a delivery may connect to `address`: a public unicast address, or loopback
    outside production. Never private, link-local, multicast, reserved or unspecified."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return allow_loopback
    return address.is_global and not (
        address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


class LookupFailed(Exception):
    pass


def resolve(host: str, port: int, timeout: float) -> list[IpAddress]:
    """The addresses of `host`, in the resolver's order; LookupFailed when it has none
    within `timeout` (getaddrinfo has no timeout of its own: it runs in a thread)."""
    literal = _literal_address(host)
    if literal is not None:
        return [literal]
    if host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost"):
        # RFC 6761: loopback by definition, whatever a resolver says (or fails to say).
        return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    found: list[IpAddress] = []
    failure: list[str] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            failure.append(str(getattr(error, "strerror", None) or error))
            return
        for *_, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in found:
                found.append(address)

    thread = threading.Thread(target=lookup, name="webhook-lookup", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LookupFailed(f"name lookup of {host} timed out")
    if not found:
        raise LookupFailed(f"name lookup of {host} failed: {failure[0] if failure else 'none'}")
    return found


def check_url(url: str, *, allow_loopback: bool) -> str:
    """A URL a webhook may be created with: well formed, and in production no name or
    address that is or resolves to a forbidden address (InvalidUrl). A name that does not
    resolve now is accepted: delivery checks again, every time."""
    target = parse_url(url)
    try:
        addresses = resolve(target.host, target.port, CREATION_LOOKUP_TIMEOUT_S)
    except LookupFailed:
        return url
    for address in addresses:
        if not address_allowed(address, allow_loopback=allow_loopback):
            raise InvalidUrl(f"{target.host} is or resolves to a forbidden address ({address})")
    return url


# --- one attempt --------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post_event(
    url: str,
    secret: str,
    event_id: str,
    body: str,
    *,
    timeout: float,
    allow_loopback: bool,
) -> AttemptResult:
    """POST `body` to `url`, signed, within `timeout` seconds in all: name lookup,
    connection, TLS, request and the response's status line. Redirects are answers like
    any other (never followed). Errors say what failed, never the secret or the body."""
    deadline = time.monotonic() + timeout
    try:
        target = parse_url(url)
        addresses = resolve(target.host, target.port, timeout)
        if not all(address_allowed(a, allow_loopback=allow_loopback) for a in addresses):
            return AttemptResult(None, f"{target.host} resolves to a forbidden address")
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, event_id, timestamp, body),
            "connection": "close",
        }
        status = _post(target, addresses, headers, body.encode(), deadline)
    except Exception as error:
        if time.monotonic() >= deadline:
            return AttemptResult(None, f"no answer within {timeout:g} s")
        return AttemptResult(None, _describe(error))
    if 300 <= status < 400:
        return AttemptResult(status, "redirect not followed")
    return AttemptResult(status, None)


def _post(
    target: Target,
    addresses: Sequence[IpAddress],
    headers: dict[str, str],
    body: bytes,
    deadline: float,
) -> int:
    sock = _connect(addresses, target.port, deadline)
    holder = [sock]
    # Socket timeouts bound each read, not the whole: a receiver trickling its answer a
    # byte at a time is cut off at the deadline by shutting the socket down.
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, [holder])
    timer.start()
    connection: http.client.HTTPConnection | None = None
    try:
        if target.https:
            context = ssl.create_default_context()
            holder[0] = context.wrap_socket(sock, server_hostname=target.host)
        kind = http.client.HTTPSConnection if target.https else http.client.HTTPConnection
        connection = kind(target.host, target.port)
        # The connection is the one to the checked address: http.client sends on it
        # (Host: the URL's host) and never opens another.
        connection.sock = holder[0]
        connection.request("POST", target.path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        timer.cancel()
        if connection is not None:
            connection.close()
        holder[0].close()


def _connect(addresses: Sequence[IpAddress], port: int, deadline: float) -> socket.socket:
    error: OSError | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(remaining)
        try:
            sock.connect((str(address), port))
        except OSError as failed:
            sock.close()
            error = failed
            continue
        return sock
    raise error or TimeoutError()


def _shut(holder: list[socket.socket]) -> None:
    with contextlib.suppress(OSError):
        holder[0].shutdown(socket.SHUT_RDWR)


# What went wrong, for the deliveries listing: the first of these the error is.
_FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (TimeoutError, "timed out"),
    (ssl.SSLCertVerificationError, "TLS certificate not valid for the host"),
    (ssl.SSLError, "TLS handshake failed"),
    ((http.client.HTTPException, ConnectionError), "connection closed without an HTTP answer"),
)


def _describe(error: Exception) -> str:
    if isinstance(error, InvalidUrl):
        return error.detail
    if isinstance(error, LookupFailed):
        return str(error)
    for kind, text in _FAILURES:
        if isinstance(error, kind):
            return text
    if isinstance(error, OSError):
        return f"connection failed: {error.strerror or type(error).__name__}"
    return f"attempt failed: {type(error).__name__}"


def retry_delay(
    attempts: int, base: float, cap: float, jitter: Callable[[], float] = random.random
) -> float:
    """Seconds from the `attempts`-th failed attempt to the next: base * 2^(attempts-1), at
    most `cap`, less up to a fifth at random, so retries after an outage spread out."""
    delay: float = min(cap, base * 2.0 ** min(attempts - 1, 64))
    return delay * (1 - 0.2 * jitter())


# --- webhooks: the rows behind the routes ---------------------------------------------


def create_webhook(session: Session, user_id: int, url: str, events: list[str]) -> Webhook:
    # Lock the owner so two concurrent creations cannot both pass the limit check.
    session.execute(select(User.id).where(User.id == user_id).with_for_update())
    held = session.scalar(select(func.count()).where(Webhook.user_id == user_id, Webhook.enabled))
    if held is not None and held >= MAX_WEBHOOKS_PER_USER:
        raise Conflict("webhook_limit", f"a user has at most {MAX_WEBHOOKS_PER_USER} webhooks")
    webhook = Webhook(user_id=user_id, url=url, events=events, secret=new_secret())
    session.add(webhook)
    session.flush()
    session.refresh(webhook)
    return webhook


def list_webhooks(session: Session, user_id: int) -> Sequence[Webhook]:
    return session.scalars(
        select(Webhook).where(Webhook.user_id == user_id, Webhook.enabled).order_by(Webhook.id)
    ).all()


def get_webhook(session: Session, user_id: int, webhook_id: int) -> Webhook:
    webhook = session.get(Webhook, webhook_id)
    if webhook is None or webhook.user_id != user_id or not webhook.enabled:
        raise NotFound("webhook_not_found", f"no webhook {webhook_id} of user {user_id}")
    return webhook


def delete_webhook(session: Session, user_id: int, webhook_id: int) -> None:
    """Deletes it for its owner: disabled, its secret forgotten, its pending deliveries
    failed. The row stays: settlement may be writing deliveries for it at this moment,
    and a foreign key to a row deleted under it would fail that settlement."""
    deleted = session.scalar(
        update(Webhook)
        .where(Webhook.id == webhook_id, Webhook.user_id == user_id, Webhook.enabled)
        .values(enabled=False, secret="")
        .returning(Webhook.id)
    )
    if deleted is None:
        raise NotFound("webhook_not_found", f"no webhook {webhook_id} of user {user_id}")
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.webhook_id == webhook_id,
            WebhookDelivery.state == DeliveryState.PENDING,
        )
        .values(state=DeliveryState.FAILED, locked_until=None)
    )


def list_attempts(
    session: Session, webhook_id: int, *, after_id: int | None, limit: int
) -> Sequence[WebhookAttempt]:
    """A webhook's attempts, newest first: a range scan of the (webhook_id, id) index."""
    query = select(WebhookAttempt).where(WebhookAttempt.webhook_id == webhook_id)
    if after_id is not None:
        query = query.where(WebhookAttempt.id < after_id)
    return session.scalars(query.order_by(WebhookAttempt.id.desc()).limit(limit)).all()


# --- deliveries: claim, record, sweep --------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A delivery a worker holds until `lease` (its locked_until) to make one attempt."""

    delivery_id: int
    webhook_id: int
    event_id: int
    attempts: int
    deadline_at: datetime
    lease: datetime
    url: str
    secret: str = field(repr=False)  # never in a log line or a traceback's repr
    # The database's clock at the claim, and ours then: "now" later, without asking it.
    claimed_at: datetime
    claimed_monotonic: float

    def now(self) -> datetime:
        return self.claimed_at + timedelta(seconds=time.monotonic() - self.claimed_monotonic)


def _free(now: Any) -> Any:
    return or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until <= now)


def claim_delivery(
    session: Session, delivery_id: int, token: datetime | None, lease_s: float
) -> Claim | None:
    """Take a due delivery for one attempt: pending, its webhook enabled, before its
    deadline, and either free or leased to the message that carries `token`. None when
    it is not (delivered, failed, not due, held by another worker or message)."""
    now = func.now()
    held_for_us = WebhookDelivery.locked_until == token if token is not None else false()
    row = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == DeliveryState.PENDING,
            WebhookDelivery.next_attempt_at <= now,
            WebhookDelivery.deadline_at > now,
            or_(_free(now), held_for_us),
            WebhookDelivery.webhook_id == Webhook.id,
            Webhook.enabled,
        )
        .values(locked_until=now + timedelta(seconds=lease_s))
        .returning(
            WebhookDelivery.webhook_id,
            WebhookDelivery.event_id,
            WebhookDelivery.attempts,
            WebhookDelivery.deadline_at,
            WebhookDelivery.locked_until,
            Webhook.url,
            Webhook.secret,
            now,
        )
    ).one_or_none()
    if row is None:
        return None
    webhook_id, event_id, attempts, deadline_at, lease, url, secret, claimed_at = row
    assert lease is not None  # just set
    return Claim(
        delivery_id, webhook_id, event_id, attempts, deadline_at, lease, url, secret,
        claimed_at, time.monotonic(),
    )  # fmt: skip


def fail_delivery(session: Session, claim: Claim) -> None:
    """A claimed delivery that cannot be attempted at all (its event is gone)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claim.delivery_id, WebhookDelivery.state == "pending")
        .values(state=DeliveryState.FAILED, locked_until=None)
    )


def record_attempt(
    session: Session, claim: Claim, result: AttemptResult, delay_s: float
) -> WebhookAttempt:
    """The attempt's row, and the delivery's next state: delivered; or due again after
    `delay_s`; or failed when that would pass its deadline. A worker whose lease ran out
    meanwhile (another may hold the delivery now) records its attempt but leaves the
    schedule to the holder, unless it delivered."""
    now = claim.now()
    next_at: datetime | None = None
    if result.delivered:
        state = DeliveryState.DELIVERED
    elif now + timedelta(seconds=delay_s) < claim.deadline_at:
        state, next_at = DeliveryState.PENDING, now + timedelta(seconds=delay_s)
    else:
        state = DeliveryState.FAILED
    ours = true() if result.delivered else WebhookDelivery.locked_until == claim.lease
    attempt = session.scalar(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claim.delivery_id, WebhookDelivery.state == "pending", ours)
        .values(
            attempts=WebhookDelivery.attempts + 1,
            state=state,
            next_attempt_at=next_at or WebhookDelivery.next_attempt_at,
            locked_until=None,
        )
        .returning(WebhookDelivery.attempts)
    )
    row = WebhookAttempt(
        delivery_id=claim.delivery_id,
        webhook_id=claim.webhook_id,
        event_id=claim.event_id,
        attempt=attempt or claim.attempts + 1,
        status_code=result.status_code,
        error=result.error,
        next_attempt_at=next_at,
        state="retrying" if state == DeliveryState.PENDING else state.value,
    )
    session.add(row)
    session.flush()
    return row


def sweep_deliveries(session: Session, lease_s: float, limit: int = SWEEP_BATCH) -> tuple[
    int, list[tuple[int, datetime]]
]:  # fmt: skip
    """Beat's sweep: fail what is past its deadline, then lease up to `limit` due
    deliveries of enabled webhooks to messages. Returns how many failed, and each
    leased delivery with its lease (the token its message carries).

    A pending delivery is always due before its deadline (an attempt that would retry
    past it fails instead), so both steps are range scans of the due index: the sweep
    costs what is due, not what is pending."""
    now = func.now()
    due = (WebhookDelivery.state == DeliveryState.PENDING, WebhookDelivery.next_attempt_at <= now)
    expired = (
        select(WebhookDelivery.id)
        .where(*due, WebhookDelivery.deadline_at <= now, _free(now))
        .with_for_update(skip_locked=True)
    )
    failed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(expired.scalar_subquery()))
        .values(state=DeliveryState.FAILED, locked_until=None)
    ).rowcount  # type: ignore[attr-defined]
    # Deliveries of a deleted webhook are not handed out; its deletion failed them,
    # and any written concurrently with it fail at their deadline.
    ready = (
        select(WebhookDelivery.id)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(*due, WebhookDelivery.deadline_at > now, _free(now), Webhook.enabled)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(of=WebhookDelivery, skip_locked=True)
    )
    leased = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ready.scalar_subquery()))
        .values(locked_until=now + timedelta(seconds=lease_s))
        .returning(WebhookDelivery.id, WebhookDelivery.locked_until)
    ).all()
    return failed, [(delivery_id, lease) for delivery_id, lease in leased if lease is not None]
