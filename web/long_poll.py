"""Long polls (`?wait=`): how many threads they may hold, and the waiters that
settlement announcements (common.announcements) wake.

A held long poll keeps its gthread thread for up to 30 s. Without a bound, clients
waiting on transfers that cannot settle (no settler running) took every thread, and
payments and /health queued behind them for the length of the wait
(tests/chaos/test_edges.py). So long polls take a slot first; one that finds none
may wait a moment on a grace slot, else is answered at once (see docs/decisions/).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Flask, current_app

from common.announcements import CHANNEL, HOLDS_CHANNEL, Final, parse_announcement
from common.models import TransferStatus
from common.pubsub import Subscription, subscribe, subscriber, text_of
from common.render import timestamp

Body = dict[str, Any]


def long_poll_slots(threads: int) -> int:
    """How many of a process's threads long polls may hold at once: a quarter of them
    (at least one) stays for everything else."""
    return threads - max(1, threads // 4)


def grace_slots(threads: int) -> int:
    """How many more threads may wait a moment (UNHELD_GRACE_S) for a long poll that
    found every slot taken: half of what long polls leave free, rounded down."""
    return (threads - long_poll_slots(threads)) // 2


# A settlement late by a fraction of a second, not a whole Retry-After, for a client
# whose long poll came while every slot was taken (a burst after a slow batch).
UNHELD_GRACE_S = 0.25

EXTENSION = "remit.long_poll_slots"


class Slots:
    """One web process's long-poll and grace slots, sized from its thread count."""

    def __init__(self, threads: int) -> None:
        self.held = threading.BoundedSemaphore(long_poll_slots(threads))
        self.grace = threading.BoundedSemaphore(grace_slots(threads))


def install(app: Flask, threads: int) -> None:
    app.extensions[EXTENSION] = Slots(threads)


def _slots() -> Slots:
    slots: Slots = current_app.extensions[EXTENSION]
    return slots


def held(transfer_id: int, read: Callable[[], Body], wait_s: float) -> Body | None:
    """`read()` once the transfer is final, or as it is after `wait_s`, on a long-poll
    slot; None when every slot is taken."""
    return _on(_slots().held, lambda: _wait_final(transfer_id, read, wait_s))


def grace(transfer_id: int, read: Callable[[], Body], wait_s: float) -> Body | None:
    """The same for a long poll that found no slot free, on a grace slot and for at
    most UNHELD_GRACE_S; None when every grace slot is taken too."""
    wait_s = min(wait_s, UNHELD_GRACE_S)
    return _on(_slots().grace, lambda: _wait_final(transfer_id, read, wait_s))


Answer = TypeVar("Answer")


def _on(slots: threading.BoundedSemaphore, wait: Callable[[], Answer]) -> Answer | None:
    """`wait()` on one of `slots`; None when none is free."""
    if not slots.acquire(blocking=False):
        return None
    try:
        return wait()
    finally:
        slots.release()


def _wait_final(transfer_id: int, read: Callable[[], Body], wait_s: float) -> Body:
    """Listen first, then read, so that a settlement announced between the read and the
    wait is not missed. No database connection is held while waiting."""
    waiters = listener()
    waiter = waiters.register(transfer_id)
    try:
        body = read()
        if body["status"] == TransferStatus.PENDING and waiter.wait(wait_s):
            final = waiter.final
            if final is None:
                body = read()
            else:
                # What the settlement committed: the rest of the transfer never changes.
                body["status"] = final.status
                body["reason"] = final.reason
                body["settled_at"] = timestamp(final.settled_at)
    finally:
        waiters.unregister(transfer_id, waiter)
    return body


class Waiter:
    """One waiting request: woken with the transfer's final state when the message
    carried it (`final`), else only woken."""

    __slots__ = ("_event", "final")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.final: Final | None = None

    def wait(self, timeout_s: float) -> bool:
        return self._event.wait(timeout_s)

    def wake(self, final: Final | None) -> None:
        self.final = final
        self._event.set()


class Waiters:
    """The requests waiting on ids (transfers, or holds) of one channel's messages;
    `parse` reads a message as id -> the final state it carries, or None (read again)."""

    def __init__(self, parse: Callable[[bytes], Mapping[int, Final | None]]) -> None:
        self._parse = parse
        self._lock = threading.Lock()
        self._waiters: dict[int, list[Waiter]] = {}

    def wake(self, data: bytes) -> None:
        announced = self._parse(data)
        with self._lock:
            woken = [
                (waiter, announced[object_id])
                for object_id in announced.keys() & self._waiters.keys()
                for waiter in self._waiters.pop(object_id)
            ]
        for waiter, final in woken:
            waiter.wake(final)

    def register(self, object_id: int) -> Waiter:
        """Start listening for `object_id`; read it again after this."""
        # Subscribing takes a round trip; a waiter registered before it would miss
        # announcements, so wait briefly for the first subscription.
        subscriber().wait_subscribed(timeout_s=1)
        waiter = Waiter()
        with self._lock:
            self._waiters.setdefault(object_id, []).append(waiter)
        return waiter

    def unregister(self, object_id: int, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(object_id)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[object_id]


_waiters = Waiters(parse_announcement)
subscribe(CHANNEL, Subscription(_waiters.wake))


def listener() -> Waiters:
    """The process's waiters for settlement announcements."""
    return _waiters


# --- Holds ------------------------------------------------------------------------------
# A hold waits for settlement to have nothing left to do with it (reserve it, apply a
# void, settle its capture). The settler names the holds it changed on HOLDS_CHANNEL;
# a waiter then reads the hold again, and waits again while work is still outstanding.

# The hold's body, and whether settlement still has work on it.
HoldRead = tuple[Body, bool]


def held_hold(hold_id: int, read: Callable[[], HoldRead], wait_s: float) -> HoldRead | None:
    """`read()` once settlement has no work left on the hold, or as it is after
    `wait_s`, on a long-poll slot; None when every slot is taken."""
    return _on(_slots().held, lambda: _wait_hold(hold_id, read, wait_s))


def grace_hold(hold_id: int, read: Callable[[], HoldRead], wait_s: float) -> HoldRead | None:
    """The same on a grace slot, for at most UNHELD_GRACE_S; None when none is free."""
    wait_s = min(wait_s, UNHELD_GRACE_S)
    return _on(_slots().grace, lambda: _wait_hold(hold_id, read, wait_s))


def _wait_hold(hold_id: int, read: Callable[[], HoldRead], wait_s: float) -> HoldRead:
    # Listen first, then read (as _wait_final): a change announced in between is not
    # missed. One hold may change more than once (held, then a void applied).
    deadline = time.monotonic() + wait_s
    while True:
        waiter = _hold_waiters.register(hold_id)
        try:
            answer = read()
            remaining = deadline - time.monotonic()
            if not answer[1] or remaining <= 0 or not waiter.wait(remaining):
                return answer
        finally:
            _hold_waiters.unregister(hold_id, waiter)


def _hold_ids(data: bytes) -> dict[int, Final | None]:
    """A hold announcement names ids only: its waiters read the hold again."""
    return {int(part): None for part in text_of(data).split(",") if part.isdigit()}


_hold_waiters = Waiters(_hold_ids)
subscribe(HOLDS_CHANNEL, Subscription(_hold_waiters.wake))
