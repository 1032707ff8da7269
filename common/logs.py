"""Structured JSON logs for web, worker and beat, with a request id in every line.

The request id is born with the HTTP request (or taken from a sane X-Request-ID),
is stored on the transfer row, and is put back in context when the worker settles
that transfer: `grep <request id>` shows a transfer's whole life.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from common.settings import Settings, get_settings

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{8,64}")


def accept_request_id(offered: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    if offered and _SANE_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Adds the service name and the current request id to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


def json_formatter() -> JsonFormatter:
    """The formatter of every log line (and of the tests that read log lines)."""
    return JsonFormatter(
        "{levelname}{name}{message}{service}{request_id}",
        style="{",
        timestamp="time",
        rename_fields={"levelname": "level", "name": "logger"},
    )


def configure_logging(service: str, settings: Settings | None = None) -> None:
    """One JSON line per record on stderr, at settings.log_level (LOG_LEVEL, default INFO).

    `settings`: the process's (get_settings()) unless given.
    """
    settings = settings or get_settings()
    if not settings.log_setup:
        # The test suite keeps pytest's own log capture.
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter())
    handler.addFilter(ContextFilter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Servers that install their own handlers (gunicorn, celery) log through ours.
    for name in ("gunicorn.error", "celery", "celery.task"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
