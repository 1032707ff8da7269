"""Celery tasks. Thin: they call the ledger and decide what to retry."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from common.currencies import CurrencyInfo, get_currency, known_currency
from common.db import is_outage, retrying, transaction
from common.errors import NotFound
from common.ledger import (
    SETTLEMENT_ERROR,
    BatchResult,
    currencies_due,
    record_failed_attempt,
    reopen_failed,
    settle_batch,
)
from common.logs import request_id as log_context
from common.metrics import record_outcomes
from common.notify import announce_decided, announce_final
from common.redis_clients import shared_redis
from common.settings import get_settings
from worker.app import app

log = logging.getLogger(__name__)

settings = get_settings()

# A task that keeps finding work re-queues itself after this many batches or this many
# seconds, whichever comes first, so one message never holds a worker longer than the
# broker's visibility timeout (a count alone does not bound time: slow batches), and a
# warm shutdown (SIGTERM) waits for one slice of the backlog, not for all of it.
MAX_BATCHES_PER_TASK = 50
MAX_SECONDS_PER_TASK = min(30.0, settings.visibility_timeout_s / 4)

_HOUSE_OPTIONS = frozenset(
    {"autoretry_for", "max_retries", "retry_backoff", "retry_backoff_max", "retry_jitter"}
)


def remit_task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
    """The house task decorator: late acks, no results, and loud typos in options."""
    unknown = set(options) - _HOUSE_OPTIONS
    if unknown:
        raise TypeError(f"unknown task options for {name}: {sorted(unknown)}")
    return app.task(name=name, bind=True, acks_late=True, ignore_result=True, **options)


class DatabaseOutage(Exception):
    """The database is unreachable: Celery retries the whole doorbell with backoff."""


@remit_task(
    "remit.settle",
    # The backoff cap stays well below the visibility timeout (see worker.app), so a
    # retried message is never also redelivered by Redis meanwhile.
    autoretry_for=(DatabaseOutage,),
    max_retries=settings.settle_max_retries,
    retry_backoff=1,
    retry_backoff_max=min(60, settings.visibility_timeout_s // 4),
    retry_jitter=True,
)
def settle(
    self: Task,
    currency: str,
    transfer_ids: list[int] | None = None,
    request_id: str | None = None,
) -> dict[str, int]:
    """Doorbell: `currency` has pending transfers (`transfer_ids` say which, for logs).

    Settles batches until nothing of the currency is due. Returns at once if
    another settler holds the currency's lock: that one re-checks for pending
    work after each release, so nothing that rang while it ran is missed.

    A batch that fails is retried at half the size, down to a batch of one; a
    transfer that fails alone is charged a failed attempt and backs off, so one
    bad transfer cannot hold up its currency. If the database is unreachable
    the whole doorbell is retried later instead.
    """
    log_context.set(request_id)
    try:
        return _settle_until_done(currency, transfer_ids)
    except Exception as error:
        marks.not_busy(currency)
        if is_outage(error):
            log.warning("database unavailable while settling %s: %s", currency, error)
            raise DatabaseOutage(str(error)) from error
        raise
    finally:
        log_context.set(None)


class DoorbellMarks:
    """Who rang while the settler was busy, so that it looks once more before leaving;
    and whether a settler is busy, so that the API need not publish a doorbell at all.

    A doorbell that finds the currency's settlement lock taken just returns, trusting
    the holder to settle its transfer. The holder's last claim may have run before that
    transfer committed, so each doorbell leaves a mark (in Redis) *before* it tries the
    lock, the holder clears the mark once it holds the lock and before it claims, and
    after a claim that found nothing it leaves only if no new mark appeared meanwhile.
    (It used to ask PostgreSQL "anything pending?", which under load walked the pending
    index's dead entries: the most expensive statement of the whole system.)

    The API goes one step further (`leave_unless_covered`): it leaves its mark and, if a
    settler says it is busy, publishes nothing, since that settler will see the mark.
    The settler says "busy" when it takes the lock and unsays it *before* its last look
    at the marks; the API leaves its mark *before* it reads "busy". So if the API saw
    "busy", the settler's last look comes after the mark. Under load a settler is
    always running, and a Celery publish per doorbell cost the API a tenth of its CPU.
    "Busy" expires on its own, so a settler that died leaves it for seconds at most; if
    Redis loses a mark, beat's sweep rings for the transfer a few seconds later.

    Nor does the API publish while a doorbell it published is still queued: the API
    says "queued" *before* publishing, and a doorbell unsays it when it starts, after
    leaving its own mark and before it takes the lock and claims. So a transfer that
    committed before the API read "queued" is claimed by that doorbell (or, if another
    settler holds the lock, by the holder, which sees the doorbell's mark). Without it,
    whenever no settler ran, every web process published a doorbell per interval
    (`Doorbells`), each costing the API a Celery publish: a tenth of the API's CPU in
    bench phase c, which pauses the settlers. "Queued" expires after QUEUED_TTL_S, so a
    doorbell lost in the broker costs at most that.
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
        return max(60, settings.visibility_timeout_s)

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
        and it is busy."""
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


def _settle_until_done(currency: str, transfer_ids: list[int] | None) -> dict[str, int]:
    info = _currency(currency)
    if info is None:
        log.error("doorbell for unknown currency %r ignored", currency)
        return {"settled": 0, "rejected": 0}
    marks.leave(currency)
    settled = rejected = 0
    limit = settings.settle_batch_size
    deadline = time.monotonic() + MAX_SECONDS_PER_TASK
    for _ in range(MAX_BATCHES_PER_TASK):
        if time.monotonic() >= deadline:
            ring(currency)
            break
        try:
            result = retrying(partial(_settle_one_batch, currency, limit, info))
        except Exception as error:
            if is_outage(error):
                raise
            limit = _after_failed_batch(currency, limit, error)
            continue
        if result.claimed is None:
            break
        # After commit: long-polling clients answer with what the batch decided.
        if result.settled_at is not None:
            announce_decided(
                ((d.transfer_id, d.status.value, d.reason) for d in result.decisions),
                result.settled_at,
            )
        _log_decisions(result)
        record_outcomes(
            (d.status, d.reason, result.ages_s.get(d.transfer_id, 0.0)) for d in result.decisions
        )
        settled += result.settled
        rejected += result.rejected
        # Grow back after a failure shrank the batch: the bad transfer may be behind us.
        limit = min(settings.settle_batch_size, limit * 2)
        if result.claimed == 0 and not marks.take(currency):
            break
        if 0 < result.claimed < settings.settle_batch_size // 20:
            # A small batch: let a few more transfers arrive before the next claim. At
            # a steady trickle every batch would otherwise be a transfer or two, and a
            # batch's fixed cost (its transaction, lock, claim and Redis round trips)
            # would be most of the settler's work (bench d: 60 % less worker CPU, a
            # lower p99). No lock is held while it waits.
            time.sleep(settings.settle_gather_s)
    else:
        ring(currency)
    if settled or rejected:
        log.info(
            "settled %d, rejected %d %s transfers",
            settled,
            rejected,
            currency,
            extra={"doorbell_transfer_ids": transfer_ids},
        )
    return {"settled": settled, "rejected": rejected}


def _after_failed_batch(currency: str, limit: int, error: Exception) -> int:
    """Halve the batch; at a batch of one, charge the failure to that transfer."""
    if limit > 1:
        log.warning("batch of %d %s transfers failed (%r); halving", limit, currency, error)
        return limit // 2
    with transaction() as session:
        attempt = record_failed_attempt(
            session,
            currency,
            f"{type(error).__name__}: {error}",
            max_attempts=settings.settle_max_attempts,
            retry_failed_after_s=settings.failed_retry_interval_s,
        )
    if attempt is not None:
        log.error(
            "settlement attempt %d of transfer %d failed%s: %r",
            attempt.attempts,
            attempt.transfer_id,
            "; marked failed" if attempt.failed else "",
            error,
            extra={"transfer_id": attempt.transfer_id},
        )
        if attempt.failed:
            announce_final([attempt.transfer_id])
            record_outcomes([("failed", SETTLEMENT_ERROR, attempt.age_s)])
    return settings.settle_batch_size


def _log_decisions(result: BatchResult) -> None:
    """One line per batch, listing each transfer with the request id it was accepted
    under, so that grepping a request id (or `"id": N`) finds its settlement. A line per
    transfer cost the settler a fifth of its time."""
    if not result.decisions or not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "batch of %d %s transfers final",
        len(result.decisions),
        result.currency,
        extra={
            "transfers": [
                {
                    "id": decision.transfer_id,
                    "status": str(decision.status),
                    "reason": decision.reason,
                    "request_id": result.request_ids.get(decision.transfer_id),
                }
                for decision in result.decisions
            ]
        },
    )


def _currency(code: str) -> CurrencyInfo | None:
    # Every doorbell asks: answer from the process's cache without building a session.
    cached = known_currency(code)
    if cached is not None:
        return cached
    try:
        with transaction() as session:
            return get_currency(session, code)
    except NotFound:
        return None


def _settle_one_batch(currency: str, limit: int, info: CurrencyInfo) -> BatchResult:
    with transaction() as session:
        return settle_batch(
            session,
            currency,
            limit,
            info.commission_account_id,
            on_locked=lambda: marks.clear(currency),
        )


@remit_task("remit.sweep")
def sweep(self: Task) -> dict[str, int]:
    """Beat: ring for transfers whose doorbell was lost, and retry failed ones when due."""
    log_context.set(None)
    try:
        with transaction() as session:
            reopened = reopen_failed(session, settings.failed_retry_window_s)
            due = currencies_due(session, settings.sweep_pending_after_s)
    except Exception as error:
        if not is_outage(error):
            raise
        # Nothing is lost: the next sweep, a few seconds on, looks again.
        log.warning("sweep skipped, database unavailable: %s", error)
        return {}
    for transfer_id, currency in reopened:
        log.warning("retrying failed transfer %d", transfer_id, extra={"transfer_id": transfer_id})
        due.setdefault(currency, 0)
    for currency, count in sorted(due.items()):
        if count:
            log.warning("%d %s transfers pending too long: ringing again", count, currency)
        ring(currency)
    return due


def ring(currency: str, transfer_ids: list[int] | None = None) -> bool:
    """Publish a settlement doorbell. Only ever called after the transfer committed.

    Returns False if the broker is unreachable: the row stays pending and the
    sweeper rings for it later, so the caller need not fail.
    """
    try:
        settle.apply_async((currency, transfer_ids, log_context.get()), retry=True)
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
    enough: a Celery publish per accepted transfer cost the API a tenth of its time,
    and each doorbell costs a worker a task (with its events, a transaction for the
    settlement lock and Redis round trips). The first transfer after a quiet spell
    rings at once (after `delay_s`, to gather its burst); while transfers keep coming,
    the currency rings once per interval, and a settler already running picks the
    rest up through its marks. If the process dies before a doorbell leaves, the
    transfers are committed and pending, and beat's sweep rings for them.
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


doorbells = Doorbells()
