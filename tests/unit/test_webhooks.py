"""common.webhooks without servers: URL rules, the address rule, event filters, backoff,
the signature as a receiver checks it, and the webhook settings."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook

from common.settings import ConfigurationError, settings_from
from common.webhooks import (
    Claim,
    InvalidUrl,
    Target,
    address_allowed,
    event_filter,
    new_secret,
    parse_url,
    resolve,
    retry_delay,
    signature,
)
from tests.properties import examples


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://example.com", Target(False, "example.com", 80, "/")),
        (
            "https://Example.COM/a/b?x=1&y=%20#frag",
            Target(True, "example.com", 443, "/a/b?x=1&y=%20"),
        ),
        ("HTTP://127.0.0.1:8080/h", Target(False, "127.0.0.1", 8080, "/h")),
        ("https://[2001:db8::1]:8443/", Target(True, "2001:db8::1", 8443, "/")),
        ("http://my_host.internal./x", Target(False, "my_host.internal.", 80, "/x")),
    ],
)
def test_parse_url(url: str, target: Target) -> None:
    assert parse_url(url) == target


@pytest.mark.parametrize(
    "url",
    [
        "",
        "example.com",
        "mailto:a@b.c",
        "ws://example.com/",
        "http://",
        "http://user@example.com/",
        "http://:pw@example.com/",
        "http://example.com:65536/",
        "http://example.com:0/",
        "http://example.com:-1/",
        "http://[::1/",
        "http://exa mple.com/",
        "http://example.com/\n",
        "http://bücher.de/",
        "http://-x.com/",
        "http://a..b/",
        "http://" + "a" * 64 + ".com/",
        "http://" + "a." * 130 + "com/",
        "http://e.com/" + "x" * 2040,
    ],
)
def test_parse_url_refuses(url: str) -> None:
    with pytest.raises(InvalidUrl) as raised:
        parse_url(url)
    assert raised.value.code == "invalid_url"


@examples(300)
@given(st.text(max_size=300))
def test_parse_url_never_fails_otherwise(url: str) -> None:
    with contextlib.suppress(InvalidUrl):
        parse_url(url)


@pytest.mark.parametrize(
    ("address", "production", "other"),
    [
        ("8.8.8.8", True, True),
        ("2606:4700:4700::1111", True, True),
        ("127.0.0.1", False, True),
        ("127.255.0.1", False, True),
        ("::1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("::ffff:10.0.0.1", False, False),
        ("10.0.0.1", False, False),
        ("172.31.255.255", False, False),
        ("192.168.0.1", False, False),
        ("100.64.0.1", False, False),  # shared address space (carrier NAT)
        ("169.254.169.254", False, False),
        ("fe80::1", False, False),
        ("fc00::1", False, False),
        ("0.0.0.0", False, False),  # noqa: S104 - an address to refuse, not to bind
        ("::", False, False),
        ("224.0.0.1", False, False),
        ("ff02::1", False, False),
        ("240.0.0.1", False, False),
        ("255.255.255.255", False, False),
        ("192.0.2.1", False, False),  # documentation
        ("2001:db8::1", False, False),
    ],
)
def test_address_rule(address: str, production: bool, other: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert address_allowed(ip, allow_loopback=False) is production
    assert address_allowed(ip, allow_loopback=True) is other


def test_localhost_names_are_loopback_without_asking_a_resolver() -> None:
    for host in ("localhost", "localhost.", "api.localhost"):
        addresses = resolve(host, 80, 0.001)
        assert all(address.is_loopback for address in addresses)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["*"], ["*"]),
        ("*", ["*"]),
        ("transfer.settled", ["transfer.settled"]),
        (" transfer.settled ,transfer.received", ["transfer.settled", "transfer.received"]),
        (["hold.held", "hold.held", "transfer.failed"], ["hold.held", "transfer.failed"]),
    ],
)
def test_event_filter(value: object, expected: list[str]) -> None:
    assert event_filter(value) == expected


@pytest.mark.parametrize(
    "value",
    [[], "", ",", None, 5, {"*": 1}, ["*", "hold.held"], ["Transfer.Settled"], [1], ["*"] * 20],
)
def test_event_filter_refuses(value: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is the schema's detail
        event_filter(value)


def test_secrets_are_standard_and_random() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert 24 <= len(base64.b64decode(secret[6:], validate=True)) <= 64


def test_signature_is_the_standard_scheme_and_verifies() -> None:
    secret = new_secret()
    timestamp = int(time.time())
    body = '{"id":"42","type":"transfer.settled","data":{"comment":"caf\\u00e9"}}'
    signed = signature(secret, "42", timestamp, body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, f"42.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    assert signed == "v1," + base64.b64encode(expected).decode()
    headers = {"webhook-id": "42", "webhook-timestamp": str(timestamp), "webhook-signature": signed}
    assert Webhook(secret).verify(body, headers)["id"] == "42"


@pytest.mark.parametrize(
    ("attempts", "delay"), [(1, 5), (2, 10), (3, 20), (10, 2560), (11, 3600), (500, 3600)]
)
def test_backoff_doubles_up_to_the_cap(attempts: int, delay: float) -> None:
    assert retry_delay(attempts, 5, 3600, jitter=lambda: 0.0) == delay
    assert retry_delay(attempts, 5, 3600, jitter=lambda: 1.0) == pytest.approx(delay * 0.8)


def test_backoff_first_retry_within_ten_seconds_and_a_day_of_attempts() -> None:
    defaults = settings_from()
    base, cap = defaults.webhook_retry_base_s, defaults.webhook_retry_cap_s
    assert retry_delay(1, base, cap) <= 10
    elapsed, attempts = 0.0, 0
    while elapsed < 86400:
        attempts += 1
        elapsed += retry_delay(attempts, base, cap, jitter=lambda: 0.0)
    # About one attempt an hour once the cap is reached: some 33 in the 24 h.
    assert 25 <= attempts <= 40


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"webhook_timeout_s": "11"}, "WEBHOOK_TIMEOUT must be at most 10 seconds"),
        ({"webhook_timeout_s": "0"}, "WEBHOOK_TIMEOUT must be more than 0 seconds"),
        ({"webhook_timeout_s": "inf"}, "WEBHOOK_TIMEOUT must be more than 0 seconds"),
        ({"webhook_retry_base_s": "x"}, "WEBHOOK_RETRY_BASE must be a number of seconds"),
        ({"webhook_lease_s": "10"}, "WEBHOOK_LEASE must be longer than WEBHOOK_TIMEOUT"),
        ({"webhook_sweep_interval_s": "0"}, "WEBHOOK_SWEEP_INTERVAL must be more than 0"),
        ({"webhook_concurrency": "0"}, "WEBHOOK_CONCURRENCY must be at least 1"),
    ],
)
def test_webhook_settings_are_checked(values: dict[str, str], complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        settings_from(**values)


def test_webhook_settings_defaults() -> None:
    defaults = settings_from()
    assert defaults.webhook_timeout_s == 10
    assert defaults.webhook_retry_base_s == 5
    assert defaults.webhook_retry_cap_s == 3600
    assert defaults.webhook_lease_s == 60
    assert defaults.webhook_sweep_interval_s == 5
    assert defaults.webhook_concurrency == 16


def test_a_claim_never_shows_its_secret() -> None:
    now = datetime.now(UTC)
    secret = new_secret()
    claim = Claim(1, 2, 3, 0, now, now, "https://example.com/", secret, now, 0.0)
    assert secret not in repr(claim)
    assert secret[6:20] not in str(claim)
