"""/metrics exposes what an operator watches, read from the live system."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from common import backlog
from common.db import script_session
from tests.conftest import Api, settlement_held


def _samples(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    out = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def test_metrics_follow_transfers_through_their_life(api: Api) -> None:
    before = _samples(api.client)
    alice, bob = api.funded("5.00"), api.register()
    ok = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00").get_json()
    broke = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "100.00").get_json()
    assert api.wait_final(alice, ok["id"])["status"] == "settled"
    assert api.wait_final(alice, broke["id"])["status"] == "rejected"
    after = _samples(api.client)

    def grew(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    assert grew("remit_transfers_accepted_total", kind="transfer") == 2
    assert grew("remit_transfers_accepted_total", kind="deposit") == 1
    assert grew("remit_transfers_final_total", status="settled") >= 2
    assert grew("remit_transfers_final_total", status="rejected", reason="insufficient_funds") >= 1
    assert grew("remit_settlement_latency_seconds_count") >= 3
    assert (
        grew("remit_http_request_duration_seconds_count", route="/users/<id:user_id>/transfers")
        == 2
    )
    names = {name for name, _ in after}
    assert {"remit_transfers_failed", "remit_queue_depth"} <= names


def test_metrics_show_pending_transfers_and_their_age(api: Api) -> None:
    alice, bob = api.funded("5.00", "CNY"), api.register()
    with settlement_held("CNY"):
        api.transfer(alice, alice.accounts["CNY"], bob.accounts["CNY"], "1.00")
        samples = _samples(api.client)
        with script_session() as session:
            pending = backlog.pending_by_currency(session)
            failed = backlog.failed_count(session)
    assert _total(samples, "remit_transfers_pending", currency="CNY") >= 1
    assert _total(samples, "remit_transfers_oldest_pending_age_seconds", currency="CNY") >= 0
    assert re.match(r"^\d", str(_total(samples, "remit_queue_depth")))
    # The same queries, as the CLI's stats reads them.
    assert [p.currency for p in pending] == sorted(p.currency for p in pending)
    cny = next(p for p in pending if p.currency == "CNY")
    assert cny.count >= 1
    assert isinstance(cny.oldest_s, float)
    assert cny.oldest_s >= 0
    assert failed >= 0
    assert backlog.queue_depth() >= 0
