"""gunicorn settings, from the same Settings as everything else.

This is the web's entry point: it loads the settings once (common.settings.use_settings)
before gunicorn loads web.wsgi, which takes them from there.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

# Workers share Prometheus metrics through files in this folder (see web.metrics).
# prometheus_client reads the variable itself when first imported: set it before
# anything imports it. Made here, so removed here when the master exits (on_exit).
_METRICS_DIR_OWNED = not os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
if _METRICS_DIR_OWNED:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="remit-metrics-")

from prometheus_client import multiprocess  # noqa: E402 - after the variable above

from common.db import dispose_engine  # noqa: E402
from common.logs import configure_logging  # noqa: E402
from common.settings import ConfigurationError, load_settings, use_settings  # noqa: E402

try:
    _settings = load_settings()
except ConfigurationError as error:
    # One line for the operator (REMIT_ENV=production without its secrets...), not a traceback.
    print(f"remit: {error}", file=sys.stderr)
    sys.exit(2)

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.web_concurrency
# Threads let one process overlap requests that wait on PostgreSQL or Redis, and hold
# long polls (?wait=) without blocking the rest.
# gthread, pausing the connections of registrations refused for load (web.gunicorn_worker).
worker_class = "web.gunicorn_worker.PausingThreadWorker"
threads = _settings.web_threads
# One pooled connection per thread, so a burst never opens new backends
# (docs/decisions/0013-web-pool-size-equals-threads.md). An explicit DB_POOL_SIZE wins.
if "db_pool_size" not in _settings.model_fields_set:
    _settings = _settings.model_copy(update={"db_pool_size": threads})
# Also for what this process starts, which reads its settings from the environment.
os.environ.setdefault("DB_POOL_SIZE", str(_settings.db_pool_size))
use_settings(_settings)
# Load the app once in the master: workers fork with it ready (and with no
# database connections, see post_fork).
preload_app = True
keepalive = 5
# gunicorn's control socket has one default path per user: two instances (a test run
# beside a dev stack) would fight over it, and nothing here uses it.
control_socket_disable = True
graceful_timeout = 30
timeout = 60
# The app logs one JSON line per request itself (web.app), with its request id.
accesslog = None
errorlog = "-"


def when_ready(server: Any) -> None:
    configure_logging("web", _settings)


def on_exit(server: Any) -> None:
    # The metrics folder this master made lives and dies with it.
    if _METRICS_DIR_OWNED and _settings.prometheus_multiproc_dir:
        shutil.rmtree(_settings.prometheus_multiproc_dir, ignore_errors=True)


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges must not be summed with the living.
    multiprocess.mark_process_dead(worker.pid)


def post_fork(server: Any, worker: Any) -> None:
    # Connections opened in the master before fork must not be shared by workers.
    dispose_engine()
    configure_logging("web", _settings)
