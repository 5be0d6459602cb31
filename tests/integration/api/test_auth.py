"""Authentication, roles, unknown routes and U+0000 at the edge."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import ApiDeps, create_app
from saga.commands import Grant
from tests.conftest import World
from tests.integration.api.helpers import (
    API_KEYS,
    GENERATIONS,
    SUP,
    SVC,
    assert_problem,
    body,
    count_generations,
    key,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ authentication and roles
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer nope"},
    {"Authorization": "Bearer "},
    {"Authorization": "svc-key"},
    {"Authorization": "Basic svc-key"},
], ids=["missing", "unknown", "empty", "no-scheme", "basic"])
def test_missing_or_unknown_key_is_401(client: TestClient, headers: dict[str, str]) -> None:
    calls = [
        client.post(GENERATIONS, json=body(), headers={**headers, **key()}),
        client.get(f"{GENERATIONS}/{uuid.uuid4()}", headers=headers),
        client.get(GENERATIONS, headers=headers),
        client.get("/api/v1/accounts/u-42", headers=headers),
        client.put("/api/v1/accounts/u-42", json={"plan": "pro"}, headers=headers),
    ]
    for resp in calls:
        assert_problem(resp, 401, "unauthorized")


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("POST", GENERATIONS, SUP),
    ("POST", f"{GENERATIONS}/g-1/selection", SUP),
    ("POST", f"{GENERATIONS}/g-1/regenerate", SUP),
    ("POST", f"{GENERATIONS}/g-1/cancel", SUP),
    ("GET", GENERATIONS, SVC),
    ("GET", f"{GENERATIONS}/g-1/history", SVC),
    ("PUT", "/api/v1/accounts/u-42", SUP),
    ("POST", "/api/v1/accounts/u-42/grants", SUP),
])
def test_wrong_role_is_403(client: TestClient, method: str, path: str,
                           headers: dict[str, str]) -> None:
    resp = client.request(method, path, json={"plan": "pro"}, headers={**headers, **key()})
    assert_problem(resp, 403, "forbidden")


def test_auth_is_checked_before_the_body(client: TestClient, pg_world: World) -> None:
    garbage = b"{not json"
    # no key at all: 401 even with a malformed body and no Idempotency-Key
    assert_problem(client.post(GENERATIONS, content=garbage), 401, "unauthorized")
    # wrong role: 403, not 422 / 400
    assert_problem(client.post(GENERATIONS, content=garbage, headers=SUP), 403, "forbidden")
    assert_problem(client.post(f"{GENERATIONS}/g-1/selection", content=b"[1]", headers=SUP),
                   403, "forbidden")
    assert_problem(client.put("/api/v1/accounts/u-42", content=garbage, headers=SUP),
                   403, "forbidden")
    assert_problem(client.post("/api/v1/accounts/u-42/grants", content=garbage), 401,
                   "unauthorized")
    # wrong role with a bad query string: still 403, not 422
    assert_problem(client.get(GENERATIONS, params={"limit": 0, "state": "nope"}, headers=SVC),
                   403, "forbidden")
    # a body over the size limit is refused only after authentication
    assert_problem(client.post(GENERATIONS, content=b"x" * 70_000, headers=SUP),
                   403, "forbidden")
    assert count_generations(pg_world) == 0


def test_401_announces_the_bearer_scheme(client: TestClient) -> None:
    resp = client.get("/api/v1/accounts/u-42")
    assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].lower().startswith("bearer")


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    assert_problem(client.get("/api/v1/nothing-here", headers=SVC), 404, "not_found")
    assert_problem(client.delete(GENERATIONS, headers=SVC), 405)


NUL_REQUESTS: list[tuple[str, str, str, dict[str, Any], set[int]]] = [
    ("GET", f"{GENERATIONS}/%00", "svc", {}, {404}),
    ("GET", f"{GENERATIONS}/%00/history", "sup", {}, {404}),
    ("GET", "/api/v1/accounts/%00", "svc", {}, {404}),
    ("GET", GENERATIONS, "sup", {"params": {"user_id": "u\x00"}}, {200, 422}),
    ("PUT", "/api/v1/accounts/u%00x", "svc", {"json": {"plan": "pro"}}, {200, 422}),
    ("POST", GENERATIONS, "svc", {"json": body(prompt="spring\x00sale")}, {202, 422}),
    ("POST", GENERATIONS, "svc", {"json": body(metadata={"note": "a\x00b"})}, {202, 422}),
]


@pytest.mark.parametrize(("method", "path", "who", "send", "allowed"), NUL_REQUESTS,
                         ids=["get", "history", "account", "list", "put-plan", "prompt",
                              "metadata"])
def test_nul_characters_are_refused_not_a_500(pg_world: World, method: str, path: str,
                                              who: str, send: dict[str, Any],
                                              allowed: set[int]) -> None:
    """PostgreSQL cannot store U+0000: such input is a 4xx problem (or stored), never a 500."""
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS))
    pg_world.bus.handle(Grant("u-42", Decimal("10.00"), "seed"))
    headers = {**(SVC if who == "svc" else SUP), **key()}
    with TestClient(app, raise_server_exceptions=False) as lenient:
        resp = lenient.request(method, path, headers=headers, **send)
    assert resp.status_code in allowed, f"{resp.status_code} {resp.text}"
    if resp.status_code >= 400:
        assert_problem(resp, resp.status_code)
