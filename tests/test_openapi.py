"""The OpenAPI document describes exactly the routes the app serves, and /docs works offline."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from common.money import MAX_DECIMALS, InvalidAmount, parse_amount
from web.fields import AMOUNT_PATTERN
from web.openapi import document


def _flask_path(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


def test_document_is_valid_openapi(client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    spec = response.get_json()
    assert spec["openapi"].startswith("3.")
    validate(spec)


def test_every_served_route_is_documented_with_its_errors(app) -> None:
    spec = document()
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static",) or rule.rule.startswith("/docs"):
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((method.lower(), _flask_path(rule.rule)))
    documented = {
        (method, path) for path, operations in spec["paths"].items() for method in operations
    }
    assert served - {("get", "/openapi.json")} == documented
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert {"404", "405"} <= statuses, (method, path)
            if operation["security"]:
                assert "401" in statuses, (method, path)
            for status, response in operation["responses"].items():
                # /health names its failing part in its own body (docs/api.md), not a problem.
                if status.startswith(("4", "5")) and (path, status) != ("/health", "503"):
                    assert "application/problem+json" in response["content"]


def test_request_schemas_come_from_the_validating_models() -> None:
    schemas = document()["components"]["schemas"]
    transfer = schemas["TransferCreate"]
    assert set(transfer["required"]) == {"from", "to", "amount"}
    assert transfer["properties"]["comment"]["maxLength"] == 255
    assert schemas["UserCreate"]["properties"]["password"]["minLength"] == 8


def test_docs_page_is_served_without_the_internet(client) -> None:
    page = client.get("/docs/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html
    assert not re.search(r"""(src|href)=["']https?://""", html)
    for asset in re.findall(r"""(?:src|href)=["'](/docs/[^"']+)["']""", html):
        assert client.get(asset).status_code == 200, asset


# --- what the document promises about inputs is what the validators accept ----------------

AMOUNT_TEXT = st.one_of(
    st.from_regex(AMOUNT_PATTERN, fullmatch=True),
    st.from_regex(r"[0-9]{0,18}(\.[0-9]{0,8})?", fullmatch=True),
    st.text(alphabet="0123456789.-+e ", max_size=20),
)


@settings(max_examples=500, deadline=None, database=None)
@given(text=AMOUNT_TEXT)
def test_amount_pattern_is_the_parsers_rule(text: str) -> None:
    try:
        parse_amount(text, MAX_DECIMALS)
        accepted = True
    except InvalidAmount:
        accepted = False
    assert bool(re.fullmatch(AMOUNT_PATTERN, text)) == accepted, text


def test_amounts_ids_and_batch_items_are_described() -> None:
    schemas = document()["components"]["schemas"]
    amount = schemas["TransferCreate"]["properties"]["amount"]
    assert {branch["type"] for branch in amount["anyOf"]} == {"string", "number"}
    assert schemas["TransferCreate"]["properties"]["from"]["maximum"] == 2**63 - 1
    assert schemas["BatchCreate"]["properties"]["transfers"]["items"] == {
        "$ref": "#/components/schemas/BatchItem"
    }
    assert schemas["DepositCreate"]["properties"]["amount"] == amount


def test_query_parameters_are_never_null() -> None:
    for operations in document()["paths"].values():
        for operation in operations.values():
            for parameter in operation["parameters"]:
                assert "null" not in json.dumps(parameter["schema"]), parameter


def test_health_documents_its_own_503_body() -> None:
    responses = document()["paths"]["/health"]["get"]["responses"]
    assert responses["503"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Health"}}
    }


def test_every_link_names_a_documented_operation_and_its_parameters() -> None:
    spec = document()
    operations = {
        operation["operationId"]: operation
        for path_operations in spec["paths"].values()
        for operation in path_operations.values()
    }
    links = [
        link
        for path_operations in spec["paths"].values()
        for operation in path_operations.values()
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert len(links) >= 10
    for link in links:
        target = operations[link["operationId"]]
        names = {parameter["name"] for parameter in target["parameters"]}
        assert set(link.get("parameters", {})) <= names, link
        if "requestBody" in link:
            assert "requestBody" in target, link
