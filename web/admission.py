"""How many requests of a web process run at once; long polls that wait do not count.

gthread gives a request a thread for its whole life, so a long poll (`?wait=`) holds
one while it waits for a settlement. With few threads, waiting long polls starve the
rest: were the settlers down for a minute, every thread would be waiting on a long
poll and not even a payment could be submitted. With many threads, the ones that do
run contend for the GIL and each request costs more CPU (bench/README.md). So a
process has many threads (`WEB_THREADS`) and fewer slots to run in
(`WEB_ACTIVE_REQUESTS`): a request takes a slot for its work and gives it back while
it waits. A request waiting for a slot is a blocked thread: it costs no CPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from common.settings import ConfigurationError

DEFAULT_ACTIVE_REQUESTS = 16

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def active_requests() -> int:
    raw = os.environ.get("WEB_ACTIVE_REQUESTS", "").strip()
    if not raw:
        return DEFAULT_ACTIVE_REQUESTS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigurationError(f"WEB_ACTIVE_REQUESTS must be an integer ≥ 1, got {raw!r}")
    return int(raw)


class Admission:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = threading.Semaphore(slots)
        self._holding = threading.local()

    def wrap(self, app: WsgiApp) -> WsgiApp:
        """The WSGI app, run in a slot. Flask has built the whole response by the time
        it returns (nothing here streams), so the slot covers all of a request's work."""

        def admitted(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> Iterable[bytes]:
            with self._free:
                self._holding.value = True
                try:
                    return app(environ, start_response)
                finally:
                    self._holding.value = False

        return admitted

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Give this request's slot to another while it waits (a long poll)."""
        if not getattr(self._holding, "value", False):
            yield
            return
        self._holding.value = False
        self._free.release()
        try:
            yield
        finally:
            self._free.acquire()
            self._holding.value = True


admission = Admission(active_requests())
