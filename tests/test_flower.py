"""Flower, started as operators start it, sees the running worker and keeps its API behind auth."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest
import requests

from tests.servers import environment, free_port, serving

CREDENTIALS = ("operator", "flower-test-password")


@pytest.fixture
def flower(settlement_worker) -> Iterator[str]:
    port = free_port()
    login = f"--basic-auth={CREDENTIALS[0]}:{CREDENTIALS[1]}"
    command = [sys.executable, "-m", "celery", "--app", "worker.app", "flower", f"--port={port}",
               "--address=127.0.0.1", login]  # fmt: skip
    # Started after the worker answers, as run.sh does: a Flower started first shows none.
    with serving(command, environment(REMIT_LOG_SETUP="1"), port, "/healthcheck", 10) as url:
        yield url


def test_flower_lists_the_worker_and_requires_auth(flower: str, settlement_worker) -> None:
    assert requests.get(flower + "/api/workers", timeout=5).status_code == 401
    deadline = time.monotonic() + 30
    workers: dict = {}
    while not workers:
        response = requests.get(
            flower + "/api/workers", params={"refresh": "1"}, auth=CREDENTIALS, timeout=10
        )
        assert response.status_code == 200
        workers = response.json()
        assert workers or time.monotonic() < deadline, "Flower never saw the worker"
        time.sleep(0.5)
    assert settlement_worker.hostname in workers


def test_flower_lists_the_webhook_delivery_worker(flower: str, webhook_worker) -> None:
    # Operators watch deliveries in Flower: the delivery worker and its queue are there.
    deadline = time.monotonic() + 30
    workers: dict = {}
    while webhook_worker.name not in workers:
        assert time.monotonic() < deadline, f"Flower never saw {webhook_worker.name}: {workers}"
        response = requests.get(
            flower + "/api/workers", params={"refresh": "1"}, auth=CREDENTIALS, timeout=10
        )
        assert response.status_code == 200
        workers = response.json()
        time.sleep(0.5)
    queues = [queue["name"] for queue in workers[webhook_worker.name]["active_queues"]]
    assert queues == ["webhooks"]
