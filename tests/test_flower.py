"""Flower, started as operators start it, sees the running worker and keeps its API behind auth."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = ("operator", "flower-test-password")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def flower(settlement_worker) -> Iterator[str]:
    port = _free_port()
    # Started after the worker answers, as run.sh does: a Flower started first shows none.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "--app",
            "worker.app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth={CREDENTIALS[0]}:{CREDENTIALS[1]}",
        ],
        cwd=ROOT,
        env={**os.environ, "REMIT_LOG_SETUP": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url + "/healthcheck", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "Flower did not start"
                assert process.poll() is None, "Flower exited"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


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
