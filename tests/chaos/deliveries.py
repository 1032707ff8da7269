"""Webhooks in the chaos run: a real receiver on loopback, a webhook for every user, and
the check that every event the database holds reached its receiver (at least once).

The receiver is tests/webhook_receiver.py's (each request's signature verified with
standardwebhooks); it also counts the requests it is answering, so a fault can kill the
delivery worker while one of its attempts is in flight.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

import requests

from tests.chaos.harness import Stack
from tests.chaos.load import User
from tests.webhook_receiver import Answer, Receiver

# Each answer takes this long: attempts overlap, so a kill finds some in flight.
ANSWER_DELAY_S = 0.01


class ChaosReceiver(Receiver):
    def __init__(self) -> None:
        super().__init__()
        self.default = Answer(delay=ANSWER_DELAY_S)
        self.in_flight = 0
        self._counting = threading.Lock()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        with self._counting:
            self.in_flight += 1
        try:
            super()._handle(request)
        finally:
            with self._counting:
                self.in_flight -= 1


def register_webhooks(stack: Stack, users: list[User], receiver: ChaosReceiver) -> dict[int, str]:
    """One webhook for every event type per user, each at its own path; user id -> path."""

    def register(user: User) -> tuple[int, str]:
        path = f"/hooks/{user.id}"
        response = requests.post(
            f"{stack.base_url}/users/{user.id}/webhooks",
            json={"url": receiver.url(path), "events": ["*"]},
            auth=user.auth,
            timeout=30,
        )
        assert response.status_code == 201, response.text
        receiver.secrets[path] = response.json()["secret"]
        return user.id, path

    with ThreadPoolExecutor(10) as pool:
        return dict(pool.map(register, users))


def pending_deliveries(stack: Stack) -> int:
    with stack.pg.connect(stack.database) as connection:
        row = connection.execute(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'"
        ).fetchone()
    return int(row[0]) if row else 0


def drain_deliveries(stack: Stack, bound_s: float) -> tuple[float, int]:
    """Wait (bounded) until no delivery is pending: the seconds it took, and what is left."""
    started = time.monotonic()
    while (left := pending_deliveries(stack)) and time.monotonic() - started < bound_s:
        time.sleep(0.25)
    return time.monotonic() - started, left


def check_deliveries(
    stack: Stack, receiver: ChaosReceiver, paths: dict[int, str]
) -> tuple[dict[str, Any], list[str]]:
    """Every event of the users with a webhook reached their path, counted by distinct
    `webhook-id`; nothing arrived unsigned or for an event that is not theirs. Returns
    the summary's numbers and the problems found."""
    with stack.pg.connect(stack.database) as connection:
        events = connection.execute(
            "SELECT user_id, id::text, type, extract(epoch FROM created_at)::float8 "
            "FROM events WHERE user_id = ANY(%s)",
            (list(paths),),
        ).fetchall()
        states = dict(
            connection.execute(
                "SELECT state, count(*) FROM webhook_deliveries GROUP BY state"
            ).fetchall()
        )
        attempts = dict(
            connection.execute(
                "SELECT coalesce(error, status_code::text), count(*) FROM webhook_attempts "
                "GROUP BY 1 ORDER BY 2 DESC LIMIT 8"
            ).fetchall()
        )
    expected: dict[str, set[str]] = {path: set() for path in paths.values()}
    created = {}
    for user_id, event_id, _, created_at in events:
        expected[paths[user_id]].add(event_id)
        created[event_id] = created_at
    problems: list[str] = []
    first_arrival: dict[str, float] = {}
    requests_per_id: Counter[str] = Counter()
    with receiver._lock:
        received = list(receiver.received)
    incomplete = 0
    for request in received:
        if len(request.body) < int(request.headers.get("content-length") or 0):
            # The sender was killed while sending: no receiver acts on half a request.
            incomplete += 1
            continue
        if request.problem is not None:
            problems.append(f"bad request at {request.path}: {request.problem}")
            continue
        event_id = request.headers.get("webhook-id", "")
        if event_id not in expected.get(request.path, set()):
            problems.append(f"event {event_id} at {request.path} is not that user's")
            continue
        requests_per_id[event_id] += 1
        first_arrival[event_id] = min(first_arrival.get(event_id, request.at), request.at)
    lost = [
        f"event {event_id} of {path} never arrived"
        for path, ids in expected.items()
        for event_id in sorted(ids - set(first_arrival))
    ]
    problems += lost
    waits = sorted(first_arrival[i] - created[i] for i in first_arrival)
    summary = {
        "webhooks / events of their users": f"{len(paths)} / {len(events)}",
        "event types": dict(Counter(row[2] for row in events)),
        "distinct webhook-ids received / lost": f"{len(first_arrival)} / {len(lost)}",
        "requests received / cut short by a kill / bad signatures": (
            f"{len(received)} / {incomplete} / "
            f"{sum(1 for r in received if r.problem is not None) - incomplete}"
        ),
        "events received more than once": sum(1 for n in requests_per_id.values() if n > 1),
        "deliveries by state": states,
        "attempts by outcome (top 8)": attempts,
        "event -> first arrival p50 / p99 / max s": (
            f"{waits[len(waits) // 2]:.2f} / {waits[int(len(waits) * 0.99)]:.2f} / {waits[-1]:.2f}"
            if waits
            else "-"
        ),
    }
    return summary, problems
