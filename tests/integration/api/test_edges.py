"""The HTTP edge: 405 with Allow, 5xx closes the connection properly, head limits, and the
switches for /docs and /metrics."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import ApiDeps, create_app
from tests.conftest import World
from tests.integration.api.helpers import API_KEYS, GENERATIONS, SUP, SVC, assert_problem

pytestmark = pytest.mark.integration


def test_405_names_the_allowed_methods(client: TestClient, pg_world: World) -> None:
    resp = client.delete(f"{GENERATIONS}/00000000-0000-4000-8000-000000000000", headers=SVC)
    assert_problem(resp, 405, "method_not_allowed")
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= {"GET"}
    resp = client.put("/health/live")
    assert_problem(resp, 405)
    assert "GET" in resp.headers["Allow"]


class _BrokenBus:
    def handle(self, cmd: object, idem: Any = None) -> Any:
        raise RuntimeError("a bug")


def test_an_unexpected_500_says_connection_close(pg_world: World) -> None:
    app = create_app(ApiDeps(bus=_BrokenBus(), queries=pg_world.queries, api_keys=API_KEYS))
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/api/v1/accounts/u-1/grants", json={"amount": "1", "reason": "r"},
                           headers=SVC)
    assert_problem(resp, 500, "internal_error")
    assert resp.headers["Connection"] == "close"


def test_headers_over_16_kib_are_431(client: TestClient, pg_world: World) -> None:
    resp = client.get("/health/live", headers={"X-Big": "a" * (16 * 1024)})
    assert_problem(resp, 431, "request_header_fields_too_large")
    assert client.get("/health/live", headers={"X-Big": "a" * 8000}).status_code == 200


def test_a_request_target_over_8_kib_is_414(client: TestClient, pg_world: World) -> None:
    resp = client.get(f"{GENERATIONS}?user_id=u&pad={'x' * 8200}", headers=SUP)
    assert_problem(resp, 414, "uri_too_long")


def test_docs_can_require_a_key(pg_world: World) -> None:
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS,
                             public_docs=False))
    with TestClient(app) as client:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert_problem(client.get(path), 401, "unauthorized")
            assert client.get(path, headers=SUP).status_code == 200
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_docs_are_public_by_default(client: TestClient, pg_world: World) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert "swagger-ui-bundle.js" in client.get("/docs").text


def test_metrics_can_require_a_token(pg_world: World) -> None:
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS,
                             metrics_token="m-token"))
    with TestClient(app) as client:
        assert_problem(client.get("/metrics"), 401, "unauthorized")
        assert_problem(client.get("/metrics", headers=SVC), 401, "unauthorized")
        resp = client.get("/metrics", headers={"Authorization": "Bearer m-token"})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")


def _raw_request(port: int, request: bytes) -> bytes:
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_the_real_server_refuses_a_1_mib_header_and_closes(tmp_path: Any) -> None:
    from tests.integration.rabbit_fixtures import spawn_serve

    serve = spawn_serve({"AIGEN_DATA_DIR": str(tmp_path / "data"), "AIGEN_AMQP_URL": "",
                         "AIGEN_DATABASE_URL": "", "AIGEN_DEMO_WORKER": "false"},
                        str(tmp_path / "serve.log"))
    try:
        serve.wait_ready()
        big = b"X-Big: " + b"a" * (1024 * 1024) + b"\r\n"
        answer = _raw_request(serve.port, b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + big
                              + b"\r\n")
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 431"), answer[:300]
        assert b"connection: close" in head
        assert b"request_header_fields_too_large" in answer
        long_target = b"GET /health/live?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert _raw_request(serve.port, long_target).startswith(b"HTTP/1.1 414")
    finally:
        serve.proc.terminate()
        serve.proc.wait(15)
