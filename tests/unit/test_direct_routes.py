"""``api.direct``: the hot routes answer exactly as FastAPI's router would.

The same requests, good and bad, go to two apps on one scripted bus: one with the direct
path (the default) and one with ``direct_routes=False``. Status, every header and the body
bytes must be equal, and so must the latency histogram's label sets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError

from api.app import ApiDeps, create_app
from api.deps import MAX_BODY_BYTES
from api.direct import DirectRoutes, NotDirect, compile_route
from api.routes import generations
from saga.errors import BillingRefused, BillingUnavailable, DomainError
from saga.input_policy import validated_body_hash
from saga.ports import AlreadyAnswered, IdempotencyRace, IdempotencyRecord

SVC = {"Authorization": "Bearer svc-key"}
GID = "0f8fad5b-d9cb-469f-a165-70867728950e"
VIEW = {"id": GID, "state": "generating_samples", "user_id": "u-1", "project_id": None,
        "prompt": "p", "format": {"name": "instagram_post", "width": 1080, "height": 1080},
        "sample_count": 4, "samples": [], "selected_sample_id": None, "final_asset": None,
        "credits": {"held": "4.00"}, "error": None, "attempt": 1, "deadline_at": None,
        "created_at": "2025-01-01T00:00:00+00:00", "updated_at": "2025-01-01T00:00:00+00:00",
        "metadata": {"ratio": 1e16, "n": 12345678901234567890, "s": "é\u2028\x7f"},
        "attention": None}


def _outcome(cmd: object) -> str:
    """What the scripted bus does, chosen by the command's prompt or sample id."""
    return str(getattr(cmd, "prompt", None) or getattr(cmd, "sample_id", ""))


class Bus:
    def handle(self, cmd: object, idem: IdempotencyRecord | None = None) -> Any:
        what = _outcome(cmd)
        if type(cmd).__name__ == "StoreResponse":
            return None
        if what == "credits":
            raise DomainError("not enough credits", code="insufficient_credits", needed="4.00")
        if what == "unknown-sample":
            raise DomainError("no such sample", code="unknown_sample", field="sample_id")
        if what == "state":
            raise DomainError("not now", code="invalid_state", state="completed")
        if what == "replay" and idem is not None:
            raise AlreadyAnswered((idem.request_hash, 202, {**VIEW, "replayed": True}))
        if what == "reused" and idem is not None:
            raise AlreadyAnswered(("another digest", 202, VIEW))
        if what == "race":
            raise IdempotencyRace()
        if what == "db-down":
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        if what == "billing-refused":
            raise BillingRefused("no", status=400)
        if what == "billing-down":
            raise BillingUnavailable("down")
        if what == "boom":
            raise RuntimeError("unexpected")
        return {**VIEW, "prompt": what}


class Queries:
    def stored_response(self, idem: IdempotencyRecord) -> tuple[str, int, Any] | None:
        return idem.request_hash, 202, {**VIEW, "winner": True}


def _app(direct: bool) -> Any:
    deps = ApiDeps(bus=Bus(), queries=Queries(),  # type: ignore[arg-type]
                   api_keys={"svc-key": "service", "sup-key": "support"},
                   registry=CollectorRegistry())
    return create_app(deps, direct_routes=direct)


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[TestClient, TestClient]]:
    with TestClient(_app(True), raise_server_exceptions=False) as direct, \
            TestClient(_app(False), raise_server_exceptions=False) as routed:
        yield direct, routed


def start_body(**overrides: Any) -> dict[str, Any]:
    return {"user_id": "u-1", "prompt": "banner", "format": "instagram_post",
            "sample_count": 4, **overrides}


START = "/api/v1/generations"
SELECT = f"/api/v1/generations/{GID}/selection"
KEY = {**SVC, "Idempotency-Key": "k-1"}
JSON = {"content-type": "application/json"}

CASES: list[tuple[str, str, dict[str, str], bytes | None]] = [
    # (method, path, headers, body); bodies are bytes so bad JSON can be sent as is
    ("POST", START, KEY, json.dumps(start_body()).encode()),
    ("POST", START, {**KEY, "content-type": "text/plain"}, json.dumps(start_body()).encode()),
    ("POST", START, {"Idempotency-Key": "k"}, json.dumps(start_body()).encode()),
    ("POST", START, {"Authorization": "Basic svc-key", "Idempotency-Key": "k"}, b"{}"),
    ("POST", START, {"Authorization": "Bearer nope", "Idempotency-Key": "k"}, b"{}"),
    ("POST", START, {"Authorization": "Bearer sup-key", "Idempotency-Key": "k"}, b"{}"),
    ("POST", START, SVC, json.dumps(start_body()).encode()),
    ("POST", START, {**SVC, "Idempotency-Key": ""}, json.dumps(start_body()).encode()),
    ("POST", START, {**SVC, "Idempotency-Key": "k" * 256}, json.dumps(start_body()).encode()),
    ("POST", START, KEY, b""),
    ("POST", START, KEY, b"not json"),
    ("POST", START, KEY, b"[1, 2]"),
    ("POST", START, KEY, b"[" * 300 + b"]" * 300),
    ("POST", START, KEY, b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'),
    ("POST", START, KEY, json.dumps(start_body(prompt="a\x00b")).encode()),
    ("POST", START, KEY, json.dumps(start_body(sample_count=99, format="nope")).encode()),
    ("POST", START, KEY, json.dumps({"user_id": "../x"}).encode()),
    ("POST", START, KEY, json.dumps(start_body(metadata={"b": 1, "a": [1.5, None]})).encode()),
    *[("POST", START, KEY, json.dumps(start_body(prompt=outcome)).encode())
      for outcome in ("credits", "state", "replay", "reused", "race", "db-down",
                      "billing-refused", "billing-down", "boom")],
    ("POST", SELECT, KEY, b'{"sample_id": "s1", "resolution": "high"}'),
    ("POST", SELECT, SVC, b'{"sample_id": "s1", "resolution": "high"}'),
    ("POST", SELECT, {"Idempotency-Key": "k"}, b'{"sample_id": "s1"}'),
    ("POST", SELECT, KEY, b'{"sample_id": 5, "resolution": "huge"}'),
    ("POST", SELECT, KEY, b"{}"),
    ("POST", SELECT, KEY, b""),
    ("POST", "/api/v1/generations/" + "x" * 37 + "/selection", KEY, b'{"sample_id": "s1"}'),
    ("POST", "/api/v1/generations/a%3Fb/selection", KEY, b'{"sample_id": "s1"}'),
    ("POST", "/api/v1/generations/a%2Fb/selection", KEY, b'{"sample_id": "s1"}'),
    ("POST", "/api/v1/generations/%00/selection", KEY, b'{"sample_id": "s1"}'),
    ("POST", f"{SELECT}?x=1", KEY, b'{"sample_id": "s1"}'),
    ("POST", f"{SELECT}/", KEY, b'{"sample_id": "s1"}'),
    ("POST", f"{START}/", KEY, json.dumps(start_body()).encode()),
    ("POST", "/api/v1/generations//selection", KEY, b'{"sample_id": "s1"}'),
    *[("POST", SELECT, KEY, json.dumps({"sample_id": outcome}).encode())
      for outcome in ("unknown-sample", "credits", "replay", "reused", "race", "boom")],
    ("GET", SELECT, SVC, None),
    ("PUT", START, KEY, b"{}"),
    ("DELETE", SELECT, KEY, None),
]


@pytest.mark.parametrize(("method", "path", "headers", "content"), CASES)
def test_the_direct_path_answers_as_fastapi_does(
        clients: tuple[TestClient, TestClient], method: str, path: str,
        headers: dict[str, str], content: bytes | None) -> None:
    sent = {**JSON, **headers} if content is not None and "content-type" not in \
        {h.lower() for h in headers} else headers
    answers = [c.request(method, path, headers=sent, content=content) for c in clients]
    a, b = answers
    assert (a.status_code, a.headers.multi_items(), a.content) == \
        (b.status_code, b.headers.multi_items(), b.content)


def test_the_histograms_label_the_same_routes(clients: tuple[TestClient, TestClient]) -> None:
    # After the cases above (module-scoped clients): the same (method, route, status) counts.
    def counts(client: TestClient) -> dict[tuple[str, ...], float]:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        return {tuple(s.labels.values()): s.value for m in registry.collect()
                if m.name == "aigen_http_request_seconds" for s in m.samples
                if s.name.endswith("_count")}

    for method, path, headers, content in CASES:  # in case this test runs alone
        for client in clients:
            client.request(method, path, headers={**JSON, **headers}, content=content)
    direct, routed = clients
    assert counts(direct) == counts(routed)
    assert ("POST", "/api/v1/generations/{generation_id}/selection", "202") in counts(direct)


def test_the_hot_routes_skip_fastapis_router(monkeypatch: pytest.MonkeyPatch) -> None:
    handled: list[str] = []
    original = APIRoute.handle

    async def spy(self: APIRoute, scope: Any, receive: Any, send: Any) -> None:
        handled.append(self.path)
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", spy)
    with TestClient(_app(True)) as client:
        assert client.post(START, json=start_body(), headers=KEY).status_code == 202
        assert client.post(SELECT, json={"sample_id": "s1"}, headers=KEY).status_code == 202
        assert handled == []
        assert client.get(f"/api/v1/generations/{GID}/history", headers=SVC).status_code == 403
        assert handled == ["/api/v1/generations/{generation_id}/history"]


def test_the_replay_digest_is_the_body_hash_of_the_parsed_body(
        clients: tuple[TestClient, TestClient]) -> None:
    # The "replay" outcome stores the request's own digest: a replay, not a 409.
    direct, _ = clients
    response = direct.post(START, json=start_body(prompt="replay"), headers=KEY)
    assert response.status_code == 202 and response.headers["Idempotent-Replayed"] == "true"
    assert validated_body_hash({"a": 1}) == validated_body_hash({"a": 1})


def test_a_route_the_direct_path_cannot_run_exactly_is_refused() -> None:
    listing = next(r for r in generations.router.routes
                   if isinstance(r, APIRoute) and r.endpoint is generations.list_generations)
    with pytest.raises(NotDirect):
        compile_route(listing)
    with pytest.raises(NotDirect):
        DirectRoutes(lambda *a: None, _app(False), [listing])  # type: ignore[arg-type]
