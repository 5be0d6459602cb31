"""Probes, metrics and what an unexpected error looks like."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import ApiDeps, create_app
from api.deps import Cursor
from saga.ports import IdempotencyRecord
from tests.conftest import World
from tests.integration.api.helpers import (
    API_KEYS,
    SVC,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ operations
def test_health_live_and_ready(pg_world: World) -> None:
    deps = ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS,
                   readiness={"database": lambda: True, "broker": lambda: True})
    with TestClient(create_app(deps)) as test_client:
        live = test_client.get("/health/live")
        assert live.status_code == 200
        ready = test_client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": True, "broker": True}


def test_ready_is_503_when_a_dependency_is_down(pg_world: World) -> None:
    def broken() -> bool:
        raise ConnectionError("refused")

    for broker in (lambda: False, broken):
        deps = ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS,
                       readiness={"database": lambda: True, "broker": broker})
        with TestClient(create_app(deps)) as test_client:
            ready = test_client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["checks"] == {"database": True, "broker": False}
            assert test_client.get("/health/live").status_code == 200


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    client.get("/health/live")
    client.get("/api/v1/accounts/ghost", headers=SVC)
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert "# TYPE aigen_http_request_seconds histogram" in text
    assert re.search(r'aigen_http_request_seconds_count\{[^}]*route="/api/v1/accounts/'
                     r'\{user_id\}"[^}]*status="404"[^}]*\} 1\.0', text), text


def test_metrics_count_every_request_per_route_and_status(client: TestClient) -> None:
    # The edge middleware keeps the histogram's children: repeats land on the same series,
    # a new status on a new one.
    for _ in range(3):
        client.get("/api/v1/accounts/ghost", headers=SVC)
    client.get("/api/v1/accounts/ghost")  # no key: 401
    text = client.get("/metrics").text
    route = r'route="/api/v1/accounts/\{user_id\}"'
    assert re.search(r'aigen_http_request_seconds_count\{[^}]*' + route
                     + r'[^}]*status="404"[^}]*\} 3\.0', text), text
    assert re.search(r'aigen_http_request_seconds_count\{[^}]*' + route
                     + r'[^}]*status="401"[^}]*\} 1\.0', text), text


def test_an_unexpected_error_is_a_problem_response_not_a_bare_500(pg_world: World) -> None:
    class Broken:
        """A read model with a bug in every query."""

        def get(self, generation_id: str) -> dict[str, Any]:
            raise RuntimeError("a bug")

        def list_generations(self, *, user_id: str | None, state: str | None, limit: int,
                             after: Cursor | None) -> tuple[list[dict[str, Any]],
                                                            Cursor | None]:
            raise RuntimeError("a bug")

        def history(self, generation_id: str) -> dict[str, Any]:
            raise RuntimeError("a bug")

        def account(self, user_id: str) -> dict[str, Any]:
            raise RuntimeError("a bug")

        def stored_response(self, idem: IdempotencyRecord) -> tuple[str, int, Any] | None:
            raise RuntimeError("a bug")

    app = create_app(ApiDeps(bus=pg_world.bus, queries=Broken(), api_keys=API_KEYS))
    with TestClient(app, raise_server_exceptions=False) as lenient:
        resp = lenient.get("/api/v1/generations/x", headers=SVC)
    assert resp.status_code == 500
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "internal_error" and "bug" not in resp.text
