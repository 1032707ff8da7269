"""gunicorn's threaded worker, with the connections of refused clients paused.

A client refused for load (web.overload.RegistrationGate) gets its answer at once, but
its connection is read again only after a pause: a script that sends again without
waiting then waits anyway, holding no thread, and the CPU its requests would have taken
goes to everybody else (docs/decisions/0046).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

_request = threading.local()


def pause_connection(seconds: float) -> None:
    """From the app, in the request's thread: do not read this request's connection
    again for `seconds` (without effect under another server)."""
    _request.pause_s = seconds


class PausingThreadWorker(ThreadWorker):
    """`gthread` (worker_class), but a connection whose request called
    pause_connection() goes back to the poller only once its pause is over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A heap of (resume at, arrival, connection): the earliest resume first.
        self._paused: list[tuple[float, int, Any]] = []
        self._arrivals = itertools.count()

    def handle(self, conn: Any) -> Any:
        _request.pause_s = 0.0
        try:
            return super().handle(conn)
        finally:
            if _request.pause_s > 0:
                conn.remit_resume_at = time.monotonic() + _request.pause_s
            _request.pause_s = 0.0

    def finish_request(self, conn: Any, fs: Future[Any]) -> None:
        resume_at = getattr(conn, "remit_resume_at", None)
        # Every request passes here: only a paused one looks at its future.
        if resume_at is not None:
            conn.remit_resume_at = None
            kept_alive = not fs.cancelled() and fs.exception() is None and fs.result() is True
            if kept_alive and self.alive:
                heapq.heappush(self._paused, (resume_at, next(self._arrivals), conn))
                return
        super().finish_request(conn, fs)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._paused:
            timeout = min(timeout, max(0.0, self._paused[0][0] - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
        now = time.monotonic()
        while self._paused and (self._paused[0][0] <= now or not self.alive):
            _, _, conn = heapq.heappop(self._paused)
            super().finish_request(conn, _KEPT_ALIVE)


_KEPT_ALIVE: Future[bool] = Future()
_KEPT_ALIVE.set_result(True)
