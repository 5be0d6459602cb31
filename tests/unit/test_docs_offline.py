"""/docs and /redoc work without internet, and their Authorize button sends the API key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aigen.bootstrap import build
from aigen.settings import Settings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    runtime = build(Settings(data_dir=tmp_path))
    try:
        yield TestClient(runtime.app)
    finally:
        runtime.engine.dispose()  # never started: nothing else to stop


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_every_asset_from_the_service(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.search(r"https?://", html), "no asset may come from another host"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        fetched = client.get(asset)
        assert fetched.status_code == 200, asset
        assert len(fetched.content) > 1000, asset


def test_the_openapi_document_declares_the_bearer_scheme(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["ApiKey"]["description"]}
    assert doc["paths"]["/api/v1/generations"]["post"]["security"] == [{"ApiKey": []}]
    assert doc["paths"]["/api/v1/accounts/{user_id}"]["put"]["security"] == [{"ApiKey": []}]
    assert "security" not in doc["paths"]["/health/live"]["get"]
    assert "/docs" not in doc["paths"] and "/openapi.json" not in doc["paths"]
