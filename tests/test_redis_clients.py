"""Each process shares one Redis client per purpose, even when threads race to build it.

Found by the chaos suite: two gunicorn threads building the throttle's client at once
left one client uncached; garbage-collected, it closed its connection pool under the
other thread's command (ValueError / AttributeError / EBADF from redis-py: a 500).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from common import metrics, pubsub
from common.redis_clients import forget_clients
from web import throttle


@pytest.mark.parametrize(
    "factory",
    [throttle._redis, pubsub._publisher, metrics._redis, pubsub.subscriber],
    ids=["throttle", "notify", "metrics", "subscriber"],
)
def test_racing_threads_get_one_client(factory: Callable[[], Any]) -> None:
    forget_clients()
    barrier = threading.Barrier(16)
    clients: list[Any] = []

    def first_use() -> None:
        barrier.wait()
        clients.append(factory())

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(client) for client in clients}) == 1
