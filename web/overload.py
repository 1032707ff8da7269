"""Overload (docs/api.md "Overload", docs/decisions/0038): no new work in a currency
whose settlement lags behind, and 503 while every hashing slot is taken.

Each process keeps which currencies lag and reads it again at most every
`REFRESH_S` seconds (common.backlog.settlement_lag, bounded queries on the partial
indexes): a POST pays nothing for the bound while no currency lags, and one lookup of
its currency while one does.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from flask import current_app

from common import backlog
from common.db import Db, request_statements
from common.logs import accept_request_id
from common.passwords import hashing_free
from common.settings import Settings
from web import throttle
from web.context import current_settings
from web.gunicorn_worker import pause_connection
from web.metrics import REQUEST_DURATION
from web.problems import (
    HASHING_BUSY,
    HASHING_RETRY_AFTER_S,
    PROBLEMS,
    REGISTRATIONS_LIMITED,
    ApiError,
    problem_body,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

REFRESH_S = 1.0
# What a refused client is told to wait: a backlog takes seconds to clear.
BACKLOG_RETRY_AFTER_S = 5
EXTENSION = "remit.backlog"


class Backlog:
    """The currencies whose settlement lags, as this process last read them."""

    def __init__(self, settings: Settings) -> None:
        self.max_age_s = settings.max_pending_age_s
        self.max_pending = settings.max_pending
        self._lagging: frozenset[str] = frozenset()
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def lagging(self) -> frozenset[str]:
        # One thread reads again; the others go on with what was last read.
        if time.monotonic() - self._read_at >= REFRESH_S and self._lock.acquire(blocking=False):
            try:
                if time.monotonic() - self._read_at >= REFRESH_S:
                    self._lagging = request_statements(self._read)
                    self._read_at = time.monotonic()
            finally:
                self._lock.release()
        return self._lagging

    def _read(self, db: Db) -> frozenset[str]:
        lags = backlog.settlement_lag(db, self.max_age_s, self.max_pending)
        return frozenset(
            lag.currency
            for lag in lags
            if (lag.oldest_s or 0.0) > self.max_age_s or lag.pending > self.max_pending
        )

    def forget(self) -> None:
        """Read again on the next check (tests)."""
        self._read_at = -math.inf


def current_backlog() -> Backlog:
    extensions = current_app.extensions
    found: Backlog | None = extensions.get(EXTENSION)
    if found is None:
        found = extensions.setdefault(EXTENSION, Backlog(current_settings()))
    assert found is not None
    return found


def backlog_error(currency: str) -> ApiError:
    return ApiError(
        "service_unavailable",
        f"settlement of {currency} is behind; try again later",
        {"Retry-After": str(BACKLOG_RETRY_AFTER_S)},
    )


def _refuse(lookup: Callable[[Db], str | None]) -> None:
    lagging = current_backlog().lagging()
    if not lagging:
        return
    # An unknown account, transfer or hold, or another user's: the route answers its
    # own 404, as it would without a backlog.
    currency = request_statements(lookup)
    if currency in lagging:
        raise backlog_error(currency)


def check_account(account_id: int, user_id: int | None) -> None:
    """503 when the currency of `user_id`'s account lags (new transfers, payouts,
    holds); any user's account for None (deposits)."""
    _refuse(lambda db: backlog.account_currencies(db, [account_id], user_id).get(account_id))


def check_transfer(transfer_id: int, user_id: int) -> None:
    """503 when the currency of a transfer `user_id` sees lags (refunds)."""
    _refuse(lambda db: backlog.transfer_currency(db, transfer_id, user_id))


def check_hold(hold_id: int, user_id: int) -> None:
    """503 when the currency of a hold `user_id` sees lags (captures, voids)."""
    _refuse(lambda db: backlog.hold_currency(db, hold_id, user_id))


def lagging_accounts(db: Db, account_ids: list[int], user_id: int) -> dict[int, str]:
    """Of `user_id`'s accounts among these, those whose currency lags, with it (a
    batch's items)."""
    lagging = current_backlog().lagging()
    if not lagging or not account_ids:
        return {}
    currencies = backlog.account_currencies(db, account_ids, user_id)
    return {id_: code for id_, code in currencies.items() if code in lagging}


def pause_refused(settings: Settings, retry_after_s: int) -> None:
    """A registration refused for load: its connection is not read again for a moment
    (web.gunicorn_worker), never longer than the Retry-After it was given. A script
    that sends again at once then waits without holding a thread (docs/decisions/0046)."""
    pause_connection(min(settings.refused_connection_pause_s, retry_after_s))


class RegistrationGate:
    """WSGI middleware: `POST /users` is refused before Flask from an address this
    process already found over its registration limit (429), and while every hashing
    slot of the process is taken (503). A flood of registrations then costs the process
    gunicorn's parsing and these checks per request, not a Flask request (context,
    hooks, routing, form parsing, a Redis round trip, a log line): see
    docs/decisions/0044 and 0046. Refusals are counted in the request metric, not
    logged one by one."""

    def __init__(self, app: WSGIApplication, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.busy = _Refusal("service_unavailable", HASHING_BUSY)
        self.limited = _Refusal("too_many_requests", REGISTRATIONS_LIMITED)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "POST" or environ.get("PATH_INFO", "") not in (
            "/users",
            "/users/",
        ):
            return self.app(environ, start_response)
        wait = throttle.registration_refused(environ.get("REMOTE_ADDR") or "unknown")
        if wait is not None:
            pause_refused(self.settings, wait)
            return self.limited(environ, start_response, wait)
        if not hashing_free():
            pause_refused(self.settings, HASHING_RETRY_AFTER_S)
            return self.busy(environ, start_response, HASHING_RETRY_AFTER_S)
        return self.app(environ, start_response)


class _Refusal:
    """One problem answer of the gate, its body built once."""

    def __init__(self, code: str, detail: str) -> None:
        body = json.dumps(problem_body(code, detail)).encode()
        status = PROBLEMS[code][0]
        self.status = f"{status} {HTTPStatus(status).phrase.upper()}"
        self.headers = [
            ("Content-Type", "application/problem+json"),
            ("Content-Length", str(len(body))),
            ("X-Content-Type-Options", "nosniff"),
        ]
        self.body = [body]
        self.metric = REQUEST_DURATION.labels("POST", "/users", str(status))

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse, retry_after_s: int
    ) -> Iterable[bytes]:
        request_id = accept_request_id(environ.get("HTTP_X_REQUEST_ID"))
        start_response(
            self.status,
            [*self.headers, ("Retry-After", str(retry_after_s)), ("X-Request-ID", request_id)],
        )
        self.metric.observe(0.0)
        return self.body
