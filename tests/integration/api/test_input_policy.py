"""The REST side of the input policy (docs/input-rules.md), one test per refused input.

Each of these answered 500 or was accepted before the policy was wired into the routes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import ApiDeps, create_app
from tests.conftest import World
from tests.integration.api.helpers import (
    API_KEYS,
    GENERATIONS,
    SVC,
    assert_invalid,
    assert_problem,
    body,
    grant,
    key,
    start,
    start_ok,
)

pytestmark = pytest.mark.integration


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def post_raw(client: TestClient, path: str, raw: bytes) -> Any:
    headers = {**SVC, **key(), "Content-Type": "application/json"}
    return client.post(path, content=raw, headers=headers)


# ------------------------------------------------------------------ JSON nesting
BODY_ROUTES = [
    GENERATIONS, f"{GENERATIONS}/00000000-0000-4000-8000-000000000000/selection",
    f"{GENERATIONS}/00000000-0000-4000-8000-000000000000/regenerate",
    f"{GENERATIONS}/00000000-0000-4000-8000-000000000000/cancel",
    "/api/v1/accounts/u-42/grants",
]


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_body_nested_1000_deep_is_422_not_500(client: TestClient, pg_world: World,
                                                path: str) -> None:
    raw = b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}"
    problem = assert_invalid(post_raw(client, path, raw), "body")
    assert "32" in problem["errors"][0]["message"]


def test_put_account_nested_body_is_422(client: TestClient, pg_world: World) -> None:
    raw = b'{"plan":' + b"{\"a\":" * 500 + b"1" + b"}" * 500 + b"}"
    resp = client.put("/api/v1/accounts/u-42", content=raw,
                      headers={**SVC, "Content-Type": "application/json"})
    assert_invalid(resp, "body")


def test_metadata_nested_255_deep_is_422_not_500(client: TestClient, pg_world: World) -> None:
    grant(client)
    data = body(metadata={"deep": nested(255)})
    assert len(json.dumps(data["metadata"])) < 4096
    assert_invalid(start(client, data), "body")


def test_metadata_nested_within_the_limit_is_accepted(client: TestClient,
                                                      pg_world: World) -> None:
    grant(client)
    # The body is level 1, metadata 2, "deep" 3: 29 more lists reach exactly 32.
    gen = start_ok(client, metadata={"deep": nested(29)})
    assert gen["metadata"] == {"deep": nested(29)}


# ------------------------------------------------------------------ idempotency hash
def test_reordered_metadata_keys_replay_instead_of_409(client: TestClient,
                                                       pg_world: World) -> None:
    grant(client)
    idem = "reorder-1"
    first = start(client, body(metadata={"a": 1, "b": {"x": 1, "y": 2}}), idem)
    assert first.status_code == 202, first.text
    again = start(client, body(metadata={"b": {"y": 2, "x": 1}, "a": 1}), idem)
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    changed = start(client, body(metadata={"a": 2, "b": {"x": 1, "y": 2}}), idem)
    assert_problem(changed, 409, "idempotency_key_reused")


# ------------------------------------------------------------------ amounts
@pytest.mark.parametrize("amount", ["\u0661\u0660\u0660", "\uff15", "5\n", " 5", "1e2", "+5",
                                    "1,000", "1.", ".5", "0", "0.00", "1.234", "12345678901"])
def test_grant_amount_must_be_ascii_decimal(client: TestClient, pg_world: World,
                                            amount: str) -> None:
    resp = client.post("/api/v1/accounts/u-42/grants", json={"amount": amount, "reason": "r"},
                       headers=SVC)
    assert_invalid(resp, "amount")
    assert client.get("/api/v1/accounts/u-42", headers=SVC).status_code == 404  # no credit


# ------------------------------------------------------------------ user ids
UNSAFE_USER_IDS = ["u\u202e42", "u\u200b42", "u\x1b42", "..", ".", "a/b", "a\\b", " u", "u ",
                   "\ufeffu", "u\u2028"]


@pytest.mark.parametrize("user_id", UNSAFE_USER_IDS)
def test_unsafe_user_id_in_the_body_is_422(client: TestClient, pg_world: World,
                                           user_id: str) -> None:
    assert_invalid(start(client, body(user_id=user_id)), "user_id")


@pytest.mark.parametrize("user_id", ["u\u202e42", "u\u200b42", "u\x1b42", "..", " u",
                                     "a%5Cb"])
def test_unsafe_user_id_in_the_path_is_422(client: TestClient, pg_world: World,
                                           user_id: str) -> None:
    from urllib.parse import quote
    segment = quote(user_id, safe="%") if user_id != ".." else "%2E%2E"
    for method, suffix, payload in (("GET", "", None), ("PUT", "", {"plan": "pro"}),
                                    ("POST", "/grants", {"amount": "1", "reason": "r"})):
        resp = client.request(method, f"/api/v1/accounts/{segment}{suffix}", json=payload,
                              headers=SVC)
        assert_invalid(resp, "user_id")


def test_safe_user_ids_of_any_script_are_accepted(client: TestClient, pg_world: World) -> None:
    for user_id in ("José García", "user@example.com", "用户-1"):
        grant(client, user_id, "1.00")
        assert start(client, body(user_id=user_id)).status_code == 202


# ------------------------------------------------------------------ path ids
@pytest.mark.parametrize("action", ["cancel", "selection", "regenerate"])
def test_an_overlong_generation_id_is_404_before_the_database(client: TestClient,
                                                              pg_world: World,
                                                              action: str) -> None:
    payload = {"sample_id": "s1"} if action == "selection" else {}
    resp = client.post(f"{GENERATIONS}/{'x' * 300}/{action}", json=payload,
                       headers={**SVC, **key()})
    assert_problem(resp, 404, "not_found")


def test_an_overlong_generation_id_on_get_is_404(client: TestClient, pg_world: World) -> None:
    for suffix in ("", "/history"):
        resp = client.get(f"{GENERATIONS}/{'x' * 300}{suffix}", headers={
            "Authorization": "Bearer sup-key"})
        assert_problem(resp, 404, "not_found")


# ------------------------------------------------------------------ URLs from Odoo
INTERNAL_URLS = [
    "http://127.0.0.1:5432/x", "http://[::1]/x", "http://169.254.169.254/latest/meta-data/",
    "http://0x7f000001/x", "http://2130706433/x", "http://user:pass@10.0.0.1/x",
    "http://localhost/x", "http://minio:9000/x", "http://[::ffff:127.0.0.1]/x",
    "javascript:alert(1)", "file:///etc/passwd", "http://127.1/x",
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_input_asset_is_422(client: TestClient, pg_world: World, url: str) -> None:
    grant(client)
    assert_invalid(start(client, body(input_assets=["https://cdn.example.com/a.png", url])),
                   "input_assets.1")


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_logo_url_is_422(client: TestClient, pg_world: World, url: str) -> None:
    grant(client)
    assert_invalid(start(client, body(brand={"colors": [], "logo_url": url})),
                   "brand.logo_url")


def test_allow_listed_asset_host_is_accepted(pg_world: World) -> None:
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS,
                             input_asset_hosts=("minio", "10.0.0.5")))
    with TestClient(app) as client:
        grant(client)
        gen = start_ok(client, input_assets=["http://minio:9000/in/a.png",
                                             "s3://bucket/a.png"],
                       brand={"colors": [], "logo_url": "http://10.0.0.5/logo.png"})
        assert gen["state"] == "processing_samples"
        # The allow-list is exact: another spelling of an allowed address is still refused.
        assert_invalid(start(client, body(input_assets=["http://0x0a000005/a.png"])),
                       "input_assets.0")


@pytest.mark.parametrize("action", ["support/cancel", "support/retry", "support/resolve"])
def test_an_overlong_id_on_a_keyed_support_call_is_404_not_500(client: TestClient,
                                                               pg_world: World,
                                                               action: str) -> None:
    payload: dict[str, Any] = {"reason": "r"}
    if action == "support/resolve":
        payload.update(hold_id="h", outcome="released")
    resp = client.post(f"{GENERATIONS}/{'x' * 300}/{action}", json=payload,
                       headers={"Authorization": "Bearer sup-key", **key()})
    assert_problem(resp, 404, "not_found")
