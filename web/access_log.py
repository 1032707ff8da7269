"""The access log: one line per request, with what the route adds to it."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, g, request

from common.logs import accept_request_id, request_id
from web.metrics import REQUEST_DURATION

access_log = logging.getLogger("remit.access")


def log_on_access(**fields: Any) -> None:
    """Fields for this request's access line (e.g. the transfer it accepted)."""
    g.setdefault("access_log_extra", {}).update(fields)


def install_request_log(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        g.request_id = accept_request_id(request.headers.get("X-Request-ID"))
        request_id.set(g.request_id)

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers["X-Content-Type-Options"] = "nosniff"
        if "Authorization" in request.headers:
            # Balances and transfers must not linger in shared or browser caches.
            response.headers["Cache-Control"] = "no-store"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        route = request.url_rule.rule if request.url_rule else "unmatched"
        REQUEST_DURATION.labels(request.method, route, str(response.status_code)).observe(elapsed)
        user = g.get("user")
        access_log.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status_code,
            extra={
                "method": request.method,
                "path": request.path,
                "route": route,
                "status": response.status_code,
                "duration_ms": round(elapsed * 1000, 3),
                "user_id": user.id if user is not None else None,
                "remote_addr": request.remote_addr,
                **g.get("access_log_extra", {}),
            },
        )
        return response
