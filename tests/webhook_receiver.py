"""A real webhook receiver for the tests: an HTTP server on loopback that checks every
request as a receiver should (standardwebhooks' Webhook.verify) and answers as told.

Not a mock: deliveries reach it over TCP from the real delivery worker. It can answer
with any status, slowly, with a redirect, or be down (its port closed) for a while.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    # The verified event, or None with `problem` saying why it did not verify.
    event: dict[str, Any] | None
    problem: str | None
    at: float


@dataclass
class Answer:
    status: int = 204
    delay: float = 0.0
    headers: dict[str, str] | None = None


class Receiver:
    """One server; `secrets` maps a path to the secret its webhook was given."""

    def __init__(self, port: int = 0) -> None:
        self.secrets: dict[str, str] = {}
        self.received: list[Received] = []
        # Answers for the next requests to a path, in order; then `default`.
        self.script: dict[str, list[Answer]] = {}
        self.default = Answer()
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        """Listen (again, on the same port after stop())."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the port: deliveries meanwhile find the connection refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length") or 0)
        body = request.rfile.read(length)
        headers = {name.lower(): value for name, value in request.headers.items()}
        path = request.path
        event, problem = self._verify(path, headers, body)
        with self._lock:
            self.received.append(Received(path, headers, body, event, problem, time.time()))
            queued = self.script.get(path)
            answer = queued.pop(0) if queued else self.default
            self._lock.notify_all()
        if answer.delay:
            time.sleep(answer.delay)
        try:
            request.send_response(answer.status)
            for name, value in (answer.headers or {}).items():
                request.send_header(name, value)
            request.send_header("content-length", "0")
            request.end_headers()
        except OSError:
            pass  # the sender gave up waiting: that is the point of a slow answer

    def _verify(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[dict[str, Any] | None, str | None]:
        secret = self.secrets.get(path)
        if secret is None:
            return None, "no secret known for this path"
        try:
            event = Webhook(secret).verify(body, headers)
        except WebhookVerificationError as error:
            return None, str(error)
        if headers.get("content-type") != "application/json":
            return None, "content-type is not application/json"
        if event.get("id") != headers.get("webhook-id"):
            return None, "webhook-id is not the event's id"
        return event, None

    def requests_to(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def events_at(self, path: str) -> list[dict[str, Any]]:
        """Every verified event received at `path` (duplicates included)."""
        found = []
        for request in self.requests_to(path):
            assert request.problem is None, request.problem
            assert request.event is not None
            found.append(request.event)
        return found

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "deliveries"
    ) -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    received = [(r.path, r.headers.get("webhook-id")) for r in self.received]
                    raise AssertionError(f"timed out waiting for {what}; received {received}")
                self._lock.wait(min(remaining, 0.2))


def event_ids(events: list[dict[str, Any]]) -> set[str]:
    return {event["id"] for event in events}


def body_of(request: Received) -> Any:
    return json.loads(request.body)
