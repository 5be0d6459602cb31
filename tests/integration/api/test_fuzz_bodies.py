"""Random and deeply nested JSON at every body-taking route: always a 4xx problem with a
``code``, never a 500 (PostgreSQL, real message bus)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import World
from tests.integration.api.helpers import SVC, body, grant

pytestmark = pytest.mark.integration
GEN = "/api/v1/generations/00000000-0000-4000-8000-000000000000"
ROUTES = [("POST", "/api/v1/generations"), ("POST", f"{GEN}/selection"),
          ("POST", f"{GEN}/regenerate"), ("POST", f"{GEN}/cancel"),
          ("PUT", "/api/v1/accounts/u-fuzz"), ("POST", "/api/v1/accounts/u-fuzz/grants")]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

text = st.text(st.characters(codec="utf-8"), max_size=40)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text, inner, max_size=4), max_leaves=30)


def nest(depth: int, opener: str) -> str:
    closer = {"[": "]", '{"k":': "}"}[opener]
    return opener * depth + "1" + closer * depth


def send(client: TestClient, method: str, path: str, raw: bytes) -> Any:
    resp = client.request(method, path, content=raw, headers={
        **SVC, "Idempotency-Key": "fuzz", "Content-Type": "application/json"})
    assert resp.status_code < 500, resp.text
    return resp


def assert_refused_or_ok(resp: Any) -> None:
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith("application/problem+json")
        problem = resp.json()
        assert isinstance(problem["code"], str) and problem["code"]
        if resp.status_code == 422:
            assert problem["errors"] and all(e["field"] for e in problem["errors"])


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_random_json_never_500(client: TestClient, pg_world: World, method: str,
                               path: str) -> None:
    @FUZZ
    @given(value=json_values)
    def run(value: Any) -> None:
        assert_refused_or_ok(send(client, method, path, json.dumps(value).encode()))

    run()


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_deeply_nested_json_is_422(client: TestClient, pg_world: World, method: str,
                                   path: str) -> None:
    @FUZZ
    @given(depth=st.integers(33, 3000), opener=st.sampled_from(["[", '{"k":']),
           where=st.sampled_from(["top", "metadata", "field"]))
    def run(depth: int, opener: str, where: str) -> None:
        inner = nest(depth - 1, opener)
        raw = {"top": nest(depth, opener), "metadata": '{"metadata":' + inner + "}",
               "field": '{"prompt":' + inner + "}"}[where]
        resp = send(client, method, path, raw.encode())
        assert resp.status_code == 422, resp.text
        assert resp.json()["code"] == "validation_error"
        assert resp.json()["errors"][0]["field"] == "body"

    run()


def test_random_metadata_and_user_ids_never_500(client: TestClient, pg_world: World) -> None:
    grant(client, "u-42", "100.00")

    @FUZZ
    @given(metadata=st.dictionaries(text, json_values, max_size=5), user_id=text)
    def run(metadata: dict[str, Any], user_id: str) -> None:
        raw = json.dumps(body(metadata=metadata, user_id=user_id)).encode()
        resp = client.post("/api/v1/generations", content=raw, headers={
            **SVC, "Idempotency-Key": f"k-{hash(raw)}", "Content-Type": "application/json"})
        assert resp.status_code < 500, resp.text
        assert_refused_or_ok(resp)

    run()
