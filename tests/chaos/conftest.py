"""Fixtures of the chaos suite: its own PostgreSQL and Redis servers, and a summary.

The suite never touches the system PostgreSQL or Redis (tests/conftest.py's session
fixtures still create their database there; that is theirs). It starts a throwaway
cluster from the installed PostgreSQL binaries and a redis-server on free loopback
ports, which it may flush, kill and restart. Without PostgreSQL binaries the whole
suite is skipped, saying so.

Each test writes its numbers with `chaos_summary.add(...)` to .run/chaos-summary.txt,
which tests/conftest.py prints in the terminal summary (no -s needed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.servers import ServerError, find_pg_bin
from tests.chaos.harness import (
    ROOT,
    PostgresServer,
    RedisServer,
    Stack,
    install_slow_batches,
    kept_logs,
    throwaway_servers,
)

SUMMARY_FILE = ROOT / ".run" / "chaos-summary.txt"
_sections: list[tuple[str, dict[str, Any]]] = []
# Node ids of failed chaos tests: their process logs are kept.
_failed: list[str] = []


class ChaosSummary:
    def add(self, title: str, numbers: dict[str, Any]) -> None:
        _sections.append((title, numbers))
        SUMMARY_FILE.parent.mkdir(parents=True, exist_ok=True)
        with SUMMARY_FILE.open("w") as out:
            out.write(f"chaos suite run of {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            for name, values in _sections:
                out.write(_format(name, values) + "\n")


def _format(title: str, numbers: dict[str, Any]) -> str:
    lines = [f"[{title}]"]
    for key, value in numbers.items():
        text = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
        lines.append(f"  {key}: {text}")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def chaos_summary() -> ChaosSummary:
    return ChaosSummary()


@pytest.fixture(scope="session")
def chaos_servers() -> Iterator[tuple[PostgresServer, RedisServer]]:
    try:
        find_pg_bin()
    except ServerError:
        pytest.skip(
            "chaos suite skipped: no PostgreSQL server binaries (initdb, pg_ctl, postgres) "
            "under /usr/lib/postgresql/*/bin or on PATH; install postgresql to run it"
        )
    with throwaway_servers() as servers:
        yield servers


@pytest.fixture(scope="session")
def chaos_logs() -> Iterator[Path]:
    """Process logs of the run, kept when a test fails (or with CHAOS_KEEP_LOGS=1)."""
    yield from kept_logs("chaos", _failed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.failed and "chaos" in item.nodeid:
        _failed.append(item.nodeid)
    return report


def make_stack(
    servers: tuple[PostgresServer, RedisServer],
    logs: Path,
    name: str,
    *,
    batch_delay: float = 0.0,
    settings: dict[str, str] | None = None,
    redis_url: str | None = None,
) -> Stack:
    """A fresh database on the throwaway server, migrated, and an empty Redis."""
    pg, redis_server = servers
    if not pg.running():
        pg.start()
    if redis_server.process is None:
        redis_server.start()
    redis_server.command("FLUSHALL")
    database = f"remit_chaos_{name}"
    pg.create_database(database)
    stack = Stack(pg, redis_server, database, logs / name, settings=settings, redis_url=redis_url)
    stack.migrate()
    if batch_delay:
        install_slow_batches(pg, database, batch_delay)
    return stack


@pytest.fixture
def stack_factory(chaos_servers, chaos_logs) -> Iterator[Any]:
    stacks: list[Stack] = []

    def factory(name: str, **options: Any) -> Stack:
        stack = make_stack(chaos_servers, chaos_logs, name, **options)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop_all()
