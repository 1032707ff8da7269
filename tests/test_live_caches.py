"""What a web process remembers between requests, and the messages that keep it true.

Two caches take a round trip off every authenticated request: the login throttle's
view of which failure counters are under their limits (Redis), and the credentials
that logged in a moment ago (PostgreSQL). Each is emptied by a pub/sub message when
what it remembers changes in any process, and believed only while this process is
subscribed. These tests play the other process by publishing as it would.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
import redis
from sqlalchemy import text

from common import pubsub, users
from common.db import script_session
from common.live_cache import LiveCache
from common.passwords import hash_password
from common.settings import get_settings
from tests.conftest import Api, Member, assert_problem, basic_auth
from web import throttle
from web.context import EXTENSION, settings_of


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def subscribed() -> pubsub.Subscriber:
    """This process's subscriber, connected (so its caches are believed)."""
    subscriber = pubsub.subscriber()
    assert subscriber.wait_subscribed(5)
    return subscriber


# --- LiveCache -------------------------------------------------------------------------


def live_cache(ttl_s: float = 60.0) -> LiveCache[str, int]:
    cache: LiveCache[str, int] = LiveCache(ttl_s)
    cache.on_link(True)
    return cache


def test_nothing_is_believed_until_subscribed() -> None:
    cache: LiveCache[str, int] = LiveCache(60)
    cache.put("k", 1, 0)
    assert cache.get("k") is None
    cache.on_link(True)
    generation = cache.generation()
    assert generation is not None
    cache.put("k", 1, generation)
    assert cache.get("k") == 1


def test_losing_the_connection_drops_everything_and_keeps_nothing_new() -> None:
    cache = live_cache()
    cache.put("k", 1, cache.generation())
    cache.on_link(False)
    assert cache.get("k") is None
    assert cache.generation() is None
    cache.put("k", 1, None)
    assert cache.get("k") is None
    # Back: still empty, since messages were missed in between.
    cache.on_link(True)
    assert cache.get("k") is None


def test_a_value_read_before_a_drop_is_not_kept() -> None:
    cache = live_cache()
    before = cache.generation()
    # A message arrives while the reader is reading its source...
    cache.forget(["other"])
    # ...so what it read may predate the change: not kept, whatever the key.
    cache.put("k", 1, before)
    assert cache.get("k") is None
    cache.put("k", 2, cache.generation())
    assert cache.get("k") == 2


def test_forget_drops_only_the_keys_named_and_clear_drops_all() -> None:
    cache = live_cache()
    for key in ("a", "b", "c"):
        cache.put(key, 1, cache.generation())
    cache.forget(["a"])
    assert (cache.get("a"), cache.get("b")) == (None, 1)
    cache.clear()
    assert cache.get("b") is None
    assert cache.get("c") is None


def test_entries_expire_after_their_ttl() -> None:
    cache = live_cache(ttl_s=0.2)
    cache.put("k", 1, cache.generation())
    assert cache.get("k") == 1
    assert eventually(lambda: cache.get("k") is None, timeout_s=2)


def test_a_forked_child_believes_nothing_its_parent_remembered() -> None:
    cache = live_cache()
    cache.put("k", 1, cache.generation())
    pid = os.fork()
    if pid == 0:  # the child: no subscriber thread of its own yet
        os._exit(0 if cache.get("k") is None and not cache._live else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get("k") == 1


def test_a_message_reaches_a_subscriber_and_its_link_is_told(subscribed) -> None:
    heard: list[bytes] = []
    links: list[bool] = []
    channel = "remit:test:" + os.urandom(4).hex()
    other = pubsub.Subscriber(
        get_settings().redis_url, {channel: pubsub.Subscription(heard.append, links.append)}
    )
    assert other.wait_subscribed(5)
    try:
        assert links == [True]
        assert other.live()
        pubsub.publish(channel, "hello")
        assert eventually(lambda: heard == [b"hello"])
    finally:
        other.stop()
    # Stopped: its caches are told, and it listens no more.
    assert eventually(lambda: links == [True, False])
    assert eventually(lambda: not other.live())


def test_a_failing_handler_does_not_stop_the_subscriber() -> None:
    heard: list[bytes] = []

    def fussy(data: bytes) -> None:
        if data == b"bad":
            raise ValueError("a handler bug")
        heard.append(data)

    channel = "remit:test:" + os.urandom(4).hex()
    other = pubsub.Subscriber(get_settings().redis_url, {channel: pubsub.Subscription(fussy)})
    assert other.wait_subscribed(5)
    try:
        pubsub.publish(channel, "bad")
        pubsub.publish(channel, "good")
        assert eventually(lambda: heard == [b"good"])
        assert other.live()
    finally:
        other.stop()


def test_a_listener_that_cannot_even_connect_tells_its_caches() -> None:
    links: list[bool] = []
    # Not a Redis URL: redis-py raises ValueError, not a RedisError, every time.
    broken = pubsub.Subscriber(
        "nonsense://nowhere", {"c": pubsub.Subscription(lambda data: None, links.append)}
    )
    broken.ensure_running()
    try:
        assert eventually(lambda: links[:1] == [False])
        assert not broken.live()
    finally:
        broken.stop()


def test_subscribing_after_the_subscriber_started_is_refused(subscribed) -> None:
    with pytest.raises(RuntimeError):
        pubsub.subscribe("remit:test:late", pubsub.Subscription(lambda data: None))


# --- the login throttle's view ---------------------------------------------------------


def _over_the_limit_elsewhere(redis_client: redis.Redis, member: Member, publish: bool) -> None:
    """What another process's failed logins leave in Redis (and, normally, say)."""
    key, _ = throttle._keys(member.username, "127.0.0.1")
    settings = get_settings()
    redis_client.set(key, settings.login_failures_per_username, ex=settings.login_throttle_window_s)
    if publish:
        redis_client.publish(throttle.FAILURES_CHANNEL, key)


def test_failures_in_another_process_throttle_this_one_at_once(
    api: Api, redis_client, subscribed
) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    key, address_key = throttle._keys(member.username, "127.0.0.1")

    def believed_under() -> bool:
        # (An earlier test's failure message, arriving late, may drop the address.)
        assert api.client.get(path, headers=member.auth).status_code == 200
        return bool(throttle.view.get(key) and throttle.view.get(address_key))

    # This process now believes the counters under their limits...
    assert eventually(believed_under)
    _over_the_limit_elsewhere(redis_client, member, publish=True)
    # ...until the other process's message arrives.
    assert eventually(lambda: throttle.view.get(key) is None)
    assert_problem(api.client.get(path, headers=member.auth), 429, "too_many_requests")


def test_a_lost_failure_message_costs_at_most_the_views_max_age(
    api: Api, redis_client, subscribed, monkeypatch
) -> None:
    monkeypatch.setattr(throttle, "view", live_cache(ttl_s=0.3))
    member = api.register()
    path = f"/users/{member.id}/accounts"
    assert api.client.get(path, headers=member.auth).status_code == 200
    _over_the_limit_elsewhere(redis_client, member, publish=False)
    time.sleep(0.4)
    assert_problem(api.client.get(path, headers=member.auth), 429, "too_many_requests")


def test_while_not_subscribed_every_check_reads_redis(
    api: Api, redis_client, subscribed, monkeypatch
) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    assert api.client.get(path, headers=member.auth).status_code == 200
    monkeypatch.setattr(throttle, "view", LiveCache(60))  # never linked
    _over_the_limit_elsewhere(redis_client, member, publish=False)
    assert_problem(api.client.get(path, headers=member.auth), 429, "too_many_requests")


def test_this_processs_own_failure_is_seen_before_its_message_returns(
    api: Api, monkeypatch
) -> None:
    # No subscriber delivers anything to this view: only record_failure itself drops.
    view = live_cache()
    monkeypatch.setattr(throttle, "view", view)
    app = api.client.application
    one_failure = settings_of(app).model_copy(update={"login_failures_per_username": 1})
    monkeypatch.setitem(app.extensions, EXTENSION, one_failure)
    member = api.register()
    path = f"/users/{member.id}/accounts"
    assert api.client.get(path, headers=member.auth).status_code == 200
    wrong = basic_auth(member.username, "not the password")
    assert api.client.get(path, headers=wrong).status_code == 401
    assert_problem(api.client.get(path, headers=member.auth), 429, "too_many_requests")


# --- the login cache -------------------------------------------------------------------


@pytest.fixture
def short_login_cache(monkeypatch, subscribed) -> LiveCache:
    cache: LiveCache = live_cache(ttl_s=0.3)
    monkeypatch.setattr(users, "_recent", cache)
    return cache


def _set_hash_by_hand(member: Member, password: str) -> None:
    with script_session() as session, session.begin():
        session.execute(
            text("UPDATE users SET password_hash = :hash WHERE id = :id"),
            {"hash": hash_password(password), "id": member.id},
        )


def test_a_login_is_remembered_and_a_wrong_password_is_not(api: Api, subscribed) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    users.forget_logins()  # what registering logged in
    assert users.recent_login(member.username, member.password) is None
    assert api.client.get(path, headers=member.auth).status_code == 200
    principal = users.recent_login(member.username, member.password)
    assert principal is not None
    assert principal.id == member.id
    assert users.recent_login(member.username, member.password + "x") is None
    # Keyed by the username as sent: another spelling logs in by the database.
    assert users.recent_login(member.username.upper(), member.password) is None


def test_a_password_changed_in_another_process_is_refused_once_announced(
    api: Api, redis_client, subscribed
) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    assert api.client.get(path, headers=member.auth).status_code == 200
    _set_hash_by_hand(member, "the other process's new password")
    # What announce_credentials_changed publishes, from another process.
    redis_client.publish(users.CREDENTIALS_CHANNEL, "")
    assert eventually(lambda: users.recent_login(member.username, member.password) is None)
    assert api.client.get(path, headers=member.auth).status_code == 401


def test_a_hash_changed_by_hand_is_refused_within_the_cache_ttl(
    api: Api, short_login_cache
) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    assert api.client.get(path, headers=member.auth).status_code == 200
    _set_hash_by_hand(member, "changed without telling anyone")
    time.sleep(0.4)
    assert api.client.get(path, headers=member.auth).status_code == 401


def test_a_login_read_before_a_change_is_not_remembered_after_it(
    api: Api, subscribed, monkeypatch
) -> None:
    member = api.register()
    path = f"/users/{member.id}/accounts"
    real_verify = users.verify_password
    changed = threading.Event()

    def verify_then_change(user_id: int, password: str, stored_hash: str) -> bool:
        # The old hash was read; the change commits and is announced before we finish.
        matches = real_verify(user_id, password, stored_hash)
        if not changed.is_set():
            changed.set()
            _set_hash_by_hand(member, "changed mid-login")
            users.announce_credentials_changed()
        return matches

    users.forget_logins()  # what registering logged in
    monkeypatch.setattr(users, "verify_password", verify_then_change)
    # This request itself passed with the password it was checked against...
    assert api.client.get(path, headers=member.auth).status_code == 200
    # ...but is not remembered: the next one reads the new hash.
    assert users.recent_login(member.username, member.password) is None
    monkeypatch.setattr(users, "verify_password", real_verify)
    assert api.client.get(path, headers=member.auth).status_code == 401
