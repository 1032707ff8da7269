"""Prometheus metrics at /metrics.

- request latency by route, and transfers accepted: counted in the API processes
  (gunicorn workers share them through PROMETHEUS_MULTIPROC_DIR);
- transfers made final by status and reason, and the latency from acceptance to
  final: counted by the workers in Redis (common.metrics), read here;
- pending count, oldest pending age, failed count and the broker's queue depth:
  read from PostgreSQL and Redis at scrape time (common.backlog).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from flask import Blueprint, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from common import backlog
from common import metrics as settlement_metrics
from common.db import request_session
from web.context import current_settings

log = logging.getLogger(__name__)

REQUEST_DURATION = Histogram(
    "remit_http_request_duration_seconds",
    "HTTP request latency by route",
    ["method", "route", "status"],
)
TRANSFERS_ACCEPTED = Counter(
    "remit_transfers_accepted_total", "Transfers accepted (202) by kind", ["kind"]
)
LONG_POLLS_UNHELD = Counter(
    "remit_long_polls_unheld_total",
    "Long polls (?wait=) answered at once because every long-poll slot was taken",
)


class LedgerCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from self._database()
        yield from self._settlements()
        yield from self._queue()

    def _database(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "remit_transfers_pending", "Transfers accepted and not yet final", labels=["currency"]
        )
        oldest = GaugeMetricFamily(
            "remit_transfers_oldest_pending_age_seconds",
            "Age of the oldest pending transfer",
            labels=["currency"],
        )
        failed = GaugeMetricFamily("remit_transfers_failed", "Transfers in status failed")
        try:
            with request_session() as session:
                rows = backlog.pending_by_currency(session)
                failed_count = backlog.failed_count(session)
        except SQLAlchemyError as error:
            log.warning("metrics: database unavailable: %s", error)
            return
        for row in rows:
            pending.add_metric([row.currency], row.count)
            oldest.add_metric([row.currency], row.oldest_s)
        failed.add_metric([], failed_count)
        yield from (pending, oldest, failed)

    def _settlements(self) -> Iterator[Metric]:
        counters = settlement_metrics.read_counters()
        final = CounterMetricFamily(
            "remit_transfers_final",
            "Transfers made final by the workers, by status and reason",
            labels=["status", "reason"],
        )
        for field, value in counters.items():
            if field.startswith("final:"):
                _, status, reason = field.split(":", 2)
                final.add_metric([status, reason], value)
        yield final
        buckets = [
            (str(bound), counters.get(f"latency_le:{bound}", 0))
            for bound in settlement_metrics.LATENCY_BUCKETS
        ]
        total = counters.get("latency_count", 0)
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily(
            "remit_settlement_latency_seconds",
            "Time from acceptance to a final status",
            buckets=buckets,
            sum_value=counters.get("latency_sum_us", 0) / 1_000_000,
        )

    def _queue(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("remit_queue_depth", "Messages waiting in the broker queue")
        try:
            depth.add_metric([], backlog.queue_depth())
        except Exception as error:
            log.warning("metrics: broker unavailable: %s", error)
            return
        yield depth


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    registry = CollectorRegistry()
    shared_dir = current_settings().prometheus_multiproc_dir
    if shared_dir:
        multiprocess.MultiProcessCollector(registry, path=shared_dir)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    ledger = CollectorRegistry()
    ledger.register(LedgerCollector())
    return Response(body + generate_latest(ledger), mimetype=CONTENT_TYPE_LATEST)
