"""Fixtures of the multi-host suite: the hosts' network, and PostgreSQL and Redis on `db`.

The network is created once per session and always removed: by the fixture's finally,
by atexit for a run that ends abruptly, and at the next run's start (by name prefix)
for one that was killed outright. Process logs go to .run/multihost/<run>/ and are kept
when a test fails (or with CHAOS_KEEP_LOGS=1).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.servers import ServerError, find_pg_bin
from tests.chaos.harness import kept_logs
from tests.multihost import net as netmod
from tests.multihost.harness import HostPostgres, HostRedis, start_servers

_failed: list[str] = []


@pytest.fixture(scope="session")
def network() -> Iterator[netmod.Network]:
    why = netmod.missing()
    if why:
        pytest.skip(f"multi-host suite skipped: it {why}")
    try:
        find_pg_bin()
    except ServerError:
        pytest.skip("multi-host suite skipped: no PostgreSQL server binaries")
    if shutil.which("redis-server") is None:
        pytest.skip("multi-host suite skipped: no redis-server")
    network = netmod.Network()
    try:
        network.create()
        yield network
    finally:
        network.destroy()


@pytest.fixture(scope="session")
def db_servers(network: netmod.Network) -> Iterator[tuple[HostPostgres, HostRedis]]:
    pg, redis_server = start_servers(network)
    try:
        yield pg, redis_server
    finally:
        redis_server.destroy()
        pg.destroy()


@pytest.fixture(scope="session")
def multihost_logs() -> Iterator[Path]:
    yield from kept_logs("multihost", _failed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.failed and "multihost" in item.nodeid:
        _failed.append(item.nodeid)
    return report
