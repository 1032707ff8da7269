"""The Flask application factory."""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request
from werkzeug.routing import IntegerConverter, Map

from common.logs import accept_request_id, request_id
from web import accounts, currencies, health, metrics, transfers, users
from web.metrics import REQUEST_DURATION
from web.openapi import install_docs
from web.problems import install_error_handlers

access_log = logging.getLogger("remit.access")

# Request bodies larger than this are refused with 413 before they are read.
MAX_BODY_BYTES = 1024 * 1024


class IdConverter(IntegerConverter):
    """A path id that fits PostgreSQL's BIGINT; anything larger is simply no route (404)."""

    def __init__(self, url_map: Map, *args: object, **kwargs: object) -> None:
        super().__init__(url_map, min=0, max=2**63 - 1)


def create_app() -> Flask:
    app = Flask("remit")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.converters["id"] = IdConverter
    app.url_map.strict_slashes = False
    for blueprint in (currencies.bp, users.bp, accounts.bp, transfers.bp, health.bp, metrics.bp):
        app.register_blueprint(blueprint)
    install_docs(app)
    install_error_handlers(app)
    install_request_log(app)
    return app


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
            },
        )
        return response
