"""The OpenAPI document describes exactly the routes the app serves, and /docs works offline."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

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
                if status.startswith(("4", "5")):
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
