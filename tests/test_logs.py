"""One request id follows a transfer from the HTTP request into its settlement's log line."""

from __future__ import annotations

import json
import logging
import time

import pytest

from common.logs import ContextFilter, json_formatter
from tests.conftest import Api


def test_the_request_id_travels_into_the_settlement_log(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = api.funded("10.00"), api.register()
    caplog.set_level(logging.INFO)
    # What configure_logging adds to each record: the service and the current request id.
    caplog.handler.addFilter(ContextFilter("test"))
    request_id = "trace-" + str(time.time_ns())
    response = api.client.post(
        f"/users/{alice.id}/transfers",
        data={"from": alice.accounts["USD"], "to": bob.accounts["USD"], "amount": "1.00"},
        headers={**alice.auth, "X-Request-ID": request_id},
    )
    assert response.headers["X-Request-ID"] == request_id
    transfer_id = response.get_json()["id"]
    assert api.wait_final(alice, transfer_id)["status"] == "settled"

    def mentions(record: logging.LogRecord) -> bool:
        return request_id in json_formatter().format(record)

    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(json_formatter().format(r)) for r in caplog.records if mentions(r)]
        settled = [
            line
            for line in lines
            for transfer in line.get("transfers", [])
            if transfer["id"] == transfer_id and transfer["request_id"] == request_id
        ]
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(line.get("transfer_id") == transfer_id for line in lines), "accepted line"
    assert any(line.get("path") == f"/users/{alice.id}/transfers" for line in lines), "access"
    assert settled, "the worker's settlement line carries the request's id"
    assert settled[0]["transfers"][0]["status"] == "settled"
