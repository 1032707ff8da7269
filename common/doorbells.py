"""Settlement doorbells: the Celery message that tells a worker a currency has pending
transfers, and the Redis marks that let most of them go unpublished.

Both sides use this module: the API rings (`Doorbells`, `ring_unless_covered`), the
settler (worker.tasks) leaves, clears and takes the marks, and beat's sweep rings
(`ring`). A doorbell is the `remit.settle` task, sent by name.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from common import broker
from common.logs import request_id as log_context
from common.redis_clients import shared_redis
from common.settings import get_settings

log = logging.getLogger(__name__)


class DoorbellMarks:
    """Who rang while the settler was busy, so that it looks once more before leaving;
    and whether a settler is busy, so that the API need not publish a doorbell at all.

    A doorbell that finds the currency's settlement lock taken just returns, trusting
    the holder to settle its transfer. The holder's last claim may have run before that
    transfer committed, so each doorbell leaves a mark (in Redis) *before* it tries the
    lock, the holder clears the mark once it holds the lock and before it claims, and
    after a claim that found nothing it leaves only if no new mark appeared meanwhile.
    (Asking PostgreSQL "anything pending?" instead is far costlier: see docs/decisions/.)

    The API goes one step further (`leave_unless_covered`): it leaves its mark and, if a
    settler says it is busy, publishes nothing, since that settler will see the mark.
    The settler says "busy" when it takes the lock and unsays it *before* its last look
    at the marks; the API leaves its mark *before* it reads "busy". So if the API saw
    "busy", the settler's last look comes after the mark. Under load a settler is
    always running, and a publish per doorbell is a large share of the API's CPU.
    "Busy" expires on its own, so a settler that died leaves it for seconds at most; if
    Redis loses a mark, beat's sweep rings for the transfer a few seconds later.
    All of this assumes that whoever holds the lock is a settler, which takes the marks
    before it leaves: a settler that finds the lock taken after a batch leaves "busy"
    set for the holder.

    Nor does the API publish while a doorbell it published is still queued: the API
    says "queued" *before* publishing, and a doorbell unsays it when it starts, after
    leaving its own mark and before it takes the lock and claims. So a transfer that
    committed before the API read "queued" is claimed by that doorbell (or, if another
    settler holds the lock, by the holder, which sees the doorbell's mark). Without it,
    whenever no settler ran, every web process would publish a doorbell per interval
    (`Doorbells`). "Queued" expires after QUEUED_TTL_S, so a doorbell lost in the broker
    costs at most that.
    """

    # A settler refreshes it with every batch; longer than any batch takes.
    BUSY_TTL_S = 5
    QUEUED_TTL_S = 5
    # The API's ring, atomic: leave the mark; then 1 (covered) if a settler is busy or
    # a doorbell is queued, else say "queued" and 0: the caller publishes one.
    _RING = """
    redis.call('SET', KEYS[1], 1, 'EX', ARGV[1])
    if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
    if redis.call('SET', KEYS[3], 1, 'NX', 'EX', ARGV[2]) then return 0 end
    return 1
    """

    def _key(self, currency: str) -> str:
        return f"remit:doorbell:{currency}"

    def _busy_key(self, currency: str) -> str:
        return f"remit:settling:{currency}"

    def _redis(self) -> Any:
        return shared_redis("doorbells", 1)

    def _queued_key(self, currency: str) -> str:
        return f"remit:doorbell-queued:{currency}"

    def _ring_script(self) -> Any:
        # Registered once per client: EVALSHA sends the digest, not the script, on every
        # API ring (redis-py loads it again if Redis forgot it).
        client = self._redis()
        script = getattr(self, "_script", None)
        if script is None or script.registered_client is not client:
            script = self._script = client.register_script(self._RING)
        return script

    def _mark_ttl_s(self) -> int:
        return max(60, get_settings().visibility_timeout_s)

    def leave(self, currency: str) -> None:
        """A doorbell starts: its mark, then no longer queued (see the class)."""
        try:
            pipe = self._redis().pipeline(transaction=False)
            pipe.set(self._key(currency), 1, ex=self._mark_ttl_s())
            pipe.delete(self._queued_key(currency))
            pipe.execute()
        except RedisError as error:
            log.warning("doorbell mark not left (%s); the sweeper covers it", error)

    def leave_unless_covered(self, currency: str) -> bool:
        """Leave a mark; True if a busy settler or a queued doorbell will see it, else
        False, having said "queued": the caller publishes a doorbell."""
        keys = (self._key(currency), self._busy_key(currency), self._queued_key(currency))
        try:
            covered = self._ring_script()(keys=keys, args=(self._mark_ttl_s(), self.QUEUED_TTL_S))
        except RedisError as error:
            log.warning("doorbell mark not left (%s); publishing instead", error)
            return False
        return bool(covered)

    def not_queued(self, currency: str) -> None:
        """The doorbell said "queued" was not published after all."""
        try:
            self._redis().delete(self._queued_key(currency))
        except RedisError as error:
            log.warning("doorbell queued flag not cleared (%s); it expires", error)

    def clear(self, currency: str) -> None:
        """The settler holds the lock and is about to claim: earlier marks are covered,
        and it is busy. Runs inside the settlement transaction: bounded by the
        client's timeout, and never raises (docs/decisions/0017)."""
        try:
            pipe = self._redis().pipeline(transaction=False)
            pipe.delete(self._key(currency))
            pipe.set(self._busy_key(currency), 1, ex=self.BUSY_TTL_S)
            pipe.execute()
        except RedisError as error:
            log.warning("doorbell mark not cleared (%s)", error)

    def take(self, currency: str) -> bool:
        """The settler's last look: no longer busy, then whether someone rang since the
        last clear (and clear it). If so, it claims again, busy again."""
        try:
            pipe = self._redis().pipeline(transaction=False)
            pipe.delete(self._busy_key(currency))
            pipe.getdel(self._key(currency))
            _, mark = pipe.execute()
            return mark is not None
        except RedisError as error:
            log.warning("doorbell mark unreadable (%s); the sweeper covers it", error)
            return False

    def not_busy(self, currency: str) -> None:
        """A settler leaving without its last look (an error): let the API publish."""
        try:
            self._redis().delete(self._busy_key(currency))
        except RedisError as error:
            log.warning("settler busy flag not cleared (%s); it expires", error)


marks = DoorbellMarks()


def ring(currency: str, transfer_ids: list[int] | None = None) -> bool:
    """Publish a settlement doorbell. Only ever called after the transfer committed.

    Returns False if the broker is unreachable: the row stays pending and the
    sweeper rings for it later, so the caller need not fail.
    """
    try:
        broker.send_task(broker.SETTLE, (currency, transfer_ids, log_context.get()))
    except (BrokerError, OSError) as error:
        log.warning("doorbell for %s not published (%s); the sweeper will ring", currency, error)
        return False
    return True


def ring_unless_covered(currency: str, transfer_ids: list[int] | None = None) -> bool:
    """The API's doorbell: a mark for the settler that is running or the doorbell that
    is queued, or a Celery message when neither is (see DoorbellMarks)."""
    if marks.leave_unless_covered(currency):
        return True
    if ring(currency, transfer_ids):
        return True
    marks.not_queued(currency)
    return False


class Doorbells:
    """Coalesces one process's doorbells: at most one per currency every `interval_s`,
    rung from a background thread.

    One doorbell settles everything pending in its currency, so one per burst is
    enough; each publish costs the API CPU, and each doorbell costs a worker a task
    (with its events, a transaction for the settlement lock and Redis round trips):
    see docs/decisions/. The first transfer after a quiet spell rings at once (after
    `delay_s`, to gather its burst); while transfers keep coming, the currency rings
    once per interval, and a settler already running picks the rest up through its
    marks. If the process dies before a doorbell leaves, the transfers are committed
    and pending, and beat's sweep rings for them.
    """

    # Enough ids to trace a doorbell in the logs; the settler does not need them.
    MAX_IDS_LOGGED = 50

    def __init__(
        self,
        publish: Callable[[str, list[int]], object] | None = None,
        delay_s: float = 0.002,
        interval_s: float = 0.02,
    ) -> None:
        self._publish = publish or ring_unless_covered
        self._delay_s = delay_s
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {}
        self._last_rung: dict[str, float] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        atexit.register(self.flush)

    def ring_soon(self, currency: str, transfer_ids: list[int]) -> None:
        with self._lock:
            ids = self._pending.setdefault(currency, [])
            ids.extend(transfer_ids[: self.MAX_IDS_LOGGED - len(ids)])
            # A thread does not survive fork: start one in each process that rings.
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="doorbells", daemon=True)
                self._thread.start()
        self._wake.set()

    def flush(self) -> None:
        """Ring for everything waiting, due or not (at exit)."""
        self._ring(self._take(lambda currency: True))

    def _take(self, due: Callable[[str], bool]) -> dict[str, list[int]]:
        with self._lock:
            ready = {c: ids for c, ids in self._pending.items() if due(c)}
            for currency in ready:
                del self._pending[currency]
        return ready

    def _ring(self, ready: dict[str, list[int]]) -> None:
        for currency, ids in ready.items():
            self._last_rung[currency] = time.monotonic()
            self._publish(currency, ids)

    def _is_due(self, now: float, currency: str) -> bool:
        return now >= self._last_rung.get(currency, 0.0) + self._interval_s

    def _wait_s(self) -> float | None:
        """How long until the earliest waiting currency may ring (None: nothing waits)."""
        with self._lock:
            if not self._pending:
                return None
            now = time.monotonic()
            return max(
                0.0,
                min(self._last_rung.get(c, 0.0) + self._interval_s - now for c in self._pending),
            )

    def _run(self) -> None:
        while True:
            self._wake.wait(self._wait_s())
            self._wake.clear()
            # Let the burst that woke us gather before ringing for it.
            time.sleep(self._delay_s)
            ready = self._take(partial(self._is_due, time.monotonic()))
            try:
                self._ring(ready)
            except Exception:
                # Never let the ringer die: the sweeper covers what was not rung.
                log.exception("doorbell publish failed; the sweeper will ring")
