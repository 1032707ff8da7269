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

from common import metrics, notify
from web import throttle


@pytest.mark.parametrize(
    ("factory", "builder"),
    [
        (throttle._redis, throttle._new_client),
        (notify._publisher, notify._new_client),
        (metrics._redis, metrics._new_client),
    ],
    ids=["throttle", "notify", "metrics"],
)
def test_racing_threads_get_one_client(factory: Callable[[], Any], builder: Any) -> None:
    builder.cache_clear()
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
