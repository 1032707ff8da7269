"""The Flask application factory."""

from __future__ import annotations

from flask import Flask
from werkzeug.routing import IntegerConverter, Map

from common.limits import BIGINT_MAX
from common.settings import Settings, get_settings
from web import (
    accounts,
    api_keys,
    currencies,
    events,
    health,
    holds,
    long_poll,
    metrics,
    transfers,
    users,
    webhooks,
)
from web.access_log import install_request_log
from web.context import EXTENSION
from web.openapi import install_docs
from web.overload import RegistrationGate
from web.problems import install_error_handlers

# Request bodies larger than this are refused with 413 before they are read.
MAX_BODY_BYTES = 1024 * 1024


def _numbers_up_to(limit: int) -> str:
    """A regex of the decimal numbers from 0 to `limit`, written with at most its digits."""
    digits = str(limit)
    options = [rf"\d{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []
    for place, digit in enumerate(digits):
        if digit != "0":
            rest = len(digits) - place - 1
            options.append(rf"{digits[:place]}[0-{int(digit) - 1}]\d{{{rest}}}")
    return "(?:" + "|".join([*options, digits]) + ")"


class IdConverter(IntegerConverter):
    """A path id that fits PostgreSQL's BIGINT; anything larger is simply no route (404).
    The regex itself refuses it: werkzeug converts only after it chose a rule, and a
    failed conversion there answers 405 when the path has rules for other methods."""

    regex = _numbers_up_to(BIGINT_MAX)

    def __init__(self, url_map: Map, *args: object, **kwargs: object) -> None:
        super().__init__(url_map, min=0, max=BIGINT_MAX)


def create_app(settings: Settings | None = None) -> Flask:
    """The API, configured by `settings` (the process's, get_settings(), unless given).

    The web code reads them from the app (web.context). The engine and Redis clients
    of common/ are built from the process's settings: an entry point that loads its own
    makes them the process's first (common.settings.use_settings), as web.wsgi does.
    """
    app = Flask("remit")
    settings = settings or get_settings()
    app.extensions[EXTENSION] = settings
    long_poll.install(app, settings.web_threads)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.converters["id"] = IdConverter
    app.url_map.strict_slashes = False
    for blueprint in (
        currencies.bp,
        users.bp,
        accounts.bp,
        transfers.bp,
        api_keys.bp,
        events.bp,
        health.bp,
        metrics.bp,
        webhooks.bp,
        holds.bp,
    ):
        app.register_blueprint(blueprint)
    install_docs(app)
    install_error_handlers(app)
    install_request_log(app)
    app.wsgi_app = RegistrationGate(app.wsgi_app, settings)  # type: ignore[method-assign]
    return app
