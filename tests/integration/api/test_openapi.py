"""The served OpenAPI document is valid and tells the truth a client generator relies on."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from api.docs import CODE_STATUS, OPERATION_CODES
from api.schemas import AMOUNT_PATTERN
from saga.input_policy import check_amount
from tests.conftest import World

pytestmark = pytest.mark.integration
METHODS = {"get", "put", "post", "delete", "patch"}


@pytest.fixture
def doc(client: TestClient, pg_world: World) -> dict[str, Any]:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    return dict(resp.json())


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, ops in doc["paths"].items() for m, op in ops.items()
            if m in METHODS]


def test_the_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate(doc)


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs = set(_refs(doc))
    assert "#/components/schemas/Style" in refs and "#/components/schemas/Brand" in refs
    for ref in refs:
        _resolve(doc, ref)
    assert "$defs" not in str(doc)
    assert "HTTPValidationError" not in str(doc)


def test_every_api_operation_has_its_refusals_listed(doc: dict[str, Any]) -> None:
    listed = set(OPERATION_CODES)
    assert {(m, p) for m, p, _ in _operations(doc) if p.startswith("/api/")} == listed


def test_every_api_operation_documents_its_problems(doc: dict[str, Any]) -> None:
    for method, path, op in _operations(doc):
        responses = op["responses"]
        success = [s for s in responses if s.startswith("2")]
        assert success, (method, path)
        for status in success:
            content = responses[status].get("content", {})
            assert content and all(c.get("schema") for c in content.values()), (method, path)
        if not path.startswith("/api/"):
            continue
        assert op["security"] == [{"ApiKey": []}]
        assert "401" in responses
        for status, response in responses.items():
            if int(status) < 400:
                continue
            content = response["content"]
            assert list(content) == ["application/problem+json"], (method, path, status)
            codes = content["application/problem+json"]["schema"]["allOf"][1][
                "properties"]["code"]["enum"]
            assert codes and all(CODE_STATUS[c] == int(status) for c in codes)
            assert all(c in response["description"] for c in codes)


def test_body_routes_document_their_body_and_idempotency_key(doc: dict[str, Any]) -> None:
    for method, path, op in _operations(doc):
        if method not in ("post", "put") or not path.startswith("/api/"):
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema.get("type") == "object" and schema.get("additionalProperties") is False
        for status in ("413", "422"):
            assert status in op["responses"], (method, path, status)
        keys = [p for p in op["parameters"] if p["name"] == "Idempotency-Key"]
        assert len(keys) == 1 and keys[0]["in"] == "header", (method, path)
        assert keys[0]["required"] is (path == "/api/v1/generations"), path
        assert "409" in op["responses"]


def test_security_scheme_amounts_cursor_and_metrics(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        **doc["components"]["securitySchemes"]["ApiKey"], "type": "http", "scheme": "bearer"}
    grant = doc["paths"]["/api/v1/accounts/{user_id}/grants"]["post"]
    amount = grant["requestBody"]["content"]["application/json"]["schema"]["properties"][
        "amount"]
    assert amount["pattern"] == AMOUNT_PATTERN
    pattern = re.compile(AMOUNT_PATTERN)
    for value in ("10", "0.01", "10.50", "9999999999.99", "0", "0.00", "1.", "\u0665", "1e2",
                  "12345678901", "-1", "1.234"):
        assert (pattern.fullmatch(value) is not None) is (check_amount(value) is None), value
    listing = doc["paths"]["/api/v1/generations"]["get"]
    cursor = next(p for p in listing["parameters"] if p["name"] == "cursor")
    assert "next_cursor" in cursor["description"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
