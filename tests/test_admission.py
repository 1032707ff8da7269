"""At most WEB_ACTIVE_REQUESTS requests of a process run at once, and a long poll that
waits gives its slot back (web.admission)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from common.settings import ConfigurationError
from web import admission as admission_module
from web.admission import Admission


def _blocking_app(running: list[int], release: threading.Event, admission: Admission):
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        try:
            if environ.get("pause"):
                with admission.paused():
                    release.wait(5)
            else:
                release.wait(5)
        finally:
            with lock:
                running[0] -= 1
        return [b""]

    return app


def _start(app: Any, count: int, environ: dict[str, Any] | None = None) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=app, args=(dict(environ or {}), lambda *a: None))
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads


def test_no_more_requests_run_than_there_are_slots() -> None:
    admission = Admission(2)
    running, release = [0, 0], threading.Event()
    threads = _start(admission.wrap(_blocking_app(running, release, admission)), 5)
    time.sleep(0.3)
    assert running == [2, 2]
    release.set()
    for thread in threads:
        thread.join(5)
    assert running == [0, 2]


def test_a_waiting_request_gives_its_slot_to_another() -> None:
    admission = Admission(1)
    running, release = [0, 0], threading.Event()
    app = admission.wrap(_blocking_app(running, release, admission))
    waiting = _start(app, 3, {"pause": True})
    time.sleep(0.3)
    # All three wait (a long poll each) in the one slot's absence...
    assert running[0] == 3
    # ...and a request that works still gets the slot.
    done = threading.Event()

    def quick(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        done.set()
        return [b""]

    worker = threading.Thread(target=admission.wrap(quick), args=({}, lambda *a: None))
    worker.start()
    assert done.wait(2)
    release.set()
    for thread in [*waiting, worker]:
        thread.join(5)


def test_pausing_outside_a_slot_changes_nothing() -> None:
    admission = Admission(1)
    with admission.paused():
        pass
    # Still exactly one slot: a second holder would block.
    assert admission._free.acquire(blocking=False)
    assert not admission._free.acquire(blocking=False)


@pytest.mark.parametrize("raw", ["0", "-3", "many", "1.5"])
def test_a_bad_slot_count_is_refused(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("WEB_ACTIVE_REQUESTS", raw)
    with pytest.raises(ConfigurationError):
        admission_module.active_requests()
