"""The REST API of contract §3, end to end against PostgreSQL.

The app is built on the real message bus (``pg_world``); n8n is played through
``pg_world.bus.handle(ApplyResult(...))``; the jobs it would receive come from
``pg_world.jobs()``.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select

from api.app import ApiDeps, create_app
from persistence.tables import generations, holds
from saga.commands import ApplyResult, Cancel, Grant, StartGeneration
from tests.conftest import World

pytestmark = pytest.mark.integration

SVC = {"Authorization": "Bearer svc-key"}
SUP = {"Authorization": "Bearer sup-key"}
API_KEYS = {"svc-key": "service", "sup-key": "support"}
GENERATIONS = "/api/v1/generations"

GENERATION_FIELDS = {
    "id", "state", "user_id", "project_id", "prompt", "format", "sample_count", "samples",
    "selected_sample_id", "final_asset", "credits", "error", "attempt", "deadline_at",
    "created_at", "updated_at", "metadata",
}
AMOUNT = re.compile(r"^\d+\.\d{2}$")
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture
def client(pg_world: World) -> Iterator[TestClient]:
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS))
    with TestClient(app) as test_client:
        yield test_client


def body(**overrides: Any) -> dict[str, Any]:
    """The contract's example request, with ``overrides`` applied."""
    data: dict[str, Any] = {
        "user_id": "u-42", "prompt": "spring sale banner, pastel", "negative_prompt": None,
        "format": "instagram_post", "width": None, "height": None,
        "style": {"tone": "playful", "industry": "retail", "preset": None},
        "brand": {"colors": ["#FF6B35"], "logo_url": None},
        "input_assets": [], "sample_count": 4, "project_id": "p-7", "metadata": {},
    }
    data.update(overrides)
    return data


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def start(client: TestClient, data: dict[str, Any] | None = None,
          idem: str | None = None) -> Response:
    headers = {**SVC, "Idempotency-Key": idem or str(uuid.uuid4())}
    return client.post(GENERATIONS, json=body() if data is None else data, headers=headers)


def start_ok(client: TestClient, **overrides: Any) -> dict[str, Any]:
    resp = start(client, body(**overrides))
    assert resp.status_code == 202, resp.text
    return resp.json()


def grant(client: TestClient, user_id: str = "u-42", amount: str = "10.00") -> dict[str, Any]:
    resp = client.post(f"/api/v1/accounts/{user_id}/grants",
                       json={"amount": amount, "reason": "test"}, headers=SVC)
    assert resp.status_code == 201, resp.text
    return resp.json()


def account(client: TestClient, user_id: str = "u-42") -> dict[str, Any]:
    resp = client.get(f"/api/v1/accounts/{user_id}", headers=SVC)
    assert resp.status_code == 200, resp.text
    return resp.json()


def get(client: TestClient, gen_id: str) -> dict[str, Any]:
    resp = client.get(f"{GENERATIONS}/{gen_id}", headers=SVC)
    assert resp.status_code == 200, resp.text
    return resp.json()


def history(client: TestClient, gen_id: str) -> list[dict[str, Any]]:
    resp = client.get(f"{GENERATIONS}/{gen_id}/history", headers=SUP)
    assert resp.status_code == 200, resp.text
    return resp.json()["events"]


def samples(n: int = 4) -> list[dict[str, Any]]:
    return [{"sample_id": f"s{i}", "url": f"s3://creativeflow-assets/users/u/s{i}.png",
             "width": 512, "height": 512} for i in range(1, n + 1)]


def only_job(world: World, gen_id: str) -> dict[str, Any]:
    """The single job dispatched since the last call, for ``gen_id``."""
    jobs = world.jobs()
    assert [j["generation_id"] for j in jobs] == [gen_id], jobs
    return jobs[0]


def deliver_samples(world: World, gen_id: str) -> None:
    job = only_job(world, gen_id)
    assert job["stage"] == "samples"
    outcome = world.bus.handle(ApplyResult(
        "AIGenerationSamplesReady", gen_id, job["job_id"], samples=samples()))
    assert outcome == "applied"


def deliver_final(world: World, gen_id: str, job: dict[str, Any] | None = None) -> None:
    job = job or only_job(world, gen_id)
    assert job["stage"] == "final"
    asset = {"url": "s3://creativeflow-assets/final.png", "width": 2048, "height": 2048,
             "format": "png"}
    outcome = world.bus.handle(ApplyResult(
        "AIGenerationFinalAssetReady", gen_id, job["job_id"], asset=asset))
    assert outcome == "applied"


def awaiting_selection(client: TestClient, world: World, balance: str = "10.00",
                       user_id: str = "u-42") -> str:
    grant(client, user_id, balance)
    gen = start_ok(client, user_id=user_id)
    deliver_samples(world, gen["id"])
    view = get(client, gen["id"])
    assert view["state"] == "awaiting_selection"
    assert parse_time(view["deadline_at"]) == world.clock.now + timedelta(hours=24)
    assert [s["sample_id"] for s in view["samples"]] == ["s1", "s2", "s3", "s4"]
    return str(gen["id"])


def choose(client: TestClient, gen_id: str, payload: Any = None, **kw: Any) -> Response:
    payload = {"sample_id": "s2", "resolution": "standard"} if payload is None else payload
    return client.post(f"{GENERATIONS}/{gen_id}/selection", json=payload,
                       headers={**SVC, **kw.get("headers", {})})


def assert_problem(resp: Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert set(problem) >= PROBLEM_FIELDS, problem
    assert problem["status"] == status
    assert isinstance(problem["type"], str) and problem["type"]
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    if code is not None:
        assert problem["code"] == code, problem
    return problem


def assert_invalid(resp: Response, field: str) -> dict[str, Any]:
    """422 validation_error whose ``errors`` name ``field``."""
    problem = assert_problem(resp, 422, "validation_error")
    errors = problem["errors"]
    assert isinstance(errors, list) and errors
    for error in errors:
        assert set(error) >= {"field", "message"}
        assert isinstance(error["field"], str) and isinstance(error["message"], str)
    assert field in [e["field"] for e in errors], errors
    return problem


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


def count_generations(world: World) -> int:
    with world.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(generations)).scalar_one())


def holds_of(world: World, gen_id: str) -> list[Any]:
    with world.engine.connect() as conn:
        return list(conn.execute(select(holds).where(holds.c.generation_id == gen_id)
                                 .order_by(holds.c.created_at, holds.c.stage)))


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


# ------------------------------------------------------------------ POST /generations
def test_start_returns_the_full_generation(client: TestClient, pg_world: World) -> None:
    grant(client)
    metadata = {"odoo_order": 17, "tags": ["spring", "sale"], "nested": {"x": None, "y": 1.5}}
    resp = start(client, body(metadata=metadata))
    assert resp.status_code == 202, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    gen = resp.json()

    assert set(gen) >= GENERATION_FIELDS
    assert str(uuid.UUID(gen["id"])) == gen["id"]
    assert gen["state"] == "processing_samples"
    assert gen["user_id"] == "u-42" and gen["project_id"] == "p-7"
    assert gen["prompt"] == "spring sale banner, pastel"
    assert gen["format"] == {"name": "instagram_post", "width": 1080, "height": 1080}
    assert gen["sample_count"] == 4 and isinstance(gen["sample_count"], int)
    assert gen["samples"] == []
    assert gen["selected_sample_id"] is None and gen["final_asset"] is None
    assert gen["credits"] == {"held": "0.25", "charged": "0.00", "released": "0.00"}
    assert all(isinstance(v, str) and AMOUNT.match(v) for v in gen["credits"].values())
    assert gen["error"] is None
    assert gen["attempt"] == 1 and isinstance(gen["attempt"], int)
    now = pg_world.clock.now
    assert parse_time(gen["deadline_at"]) == now + timedelta(seconds=120)
    assert parse_time(gen["created_at"]) == now
    assert parse_time(gen["updated_at"]) == now
    assert gen["metadata"] == metadata

    # the stored resource is what was returned, and the hold is on the account
    assert get(client, gen["id"]) == gen
    assert account(client) == {"user_id": "u-42", "plan": "free", "balance": "10.00",
                               "held": "0.25", "available": "9.75"}
    job = only_job(pg_world, gen["id"])
    assert job["stage"] == "samples" and job["attempt"] == 1
    assert job["prompt"] == gen["prompt"] and job["brand"]["colors"] == ["#FF6B35"]


def test_start_with_defaults_and_a_custom_format(client: TestClient) -> None:
    grant(client)
    gen = start_ok(client, format="custom", width=64, height=4096,
                   **{"sample_count": 1, "project_id": None})
    assert gen["format"] == {"name": "custom", "width": 64, "height": 4096}
    assert gen["sample_count"] == 1 and gen["project_id"] is None

    minimal = {"user_id": "u-42", "prompt": "p", "format": "tiktok"}
    resp = start(client, minimal)
    assert resp.status_code == 202, resp.text
    gen = resp.json()
    assert gen["sample_count"] == 4 and gen["metadata"] == {}
    assert gen["format"] == {"name": "tiktok", "width": 1080, "height": 1920}


def test_paid_plan_start_is_waived(client: TestClient, pg_world: World) -> None:
    assert client.put("/api/v1/accounts/u-pro", json={"plan": "pro"},
                      headers=SVC).status_code == 200
    gen = start_ok(client, user_id="u-pro")
    assert gen["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.00"}
    credit = [e for e in history(client, gen["id"]) if e["kind"] == "credit"]
    assert [e["detail"]["op"] for e in credit] == ["waived"]
    assert credit[0]["detail"]["amount"] == "0.00" and credit[0]["detail"]["stage"] == "samples"
    assert holds_of(pg_world, gen["id"]) == []


def test_start_without_idempotency_key_is_400(client: TestClient, pg_world: World) -> None:
    grant(client)
    resp = client.post(GENERATIONS, json=body(), headers=SVC)
    assert_problem(resp, 400, "idempotency_key_required")
    assert count_generations(pg_world) == 0


def test_idempotency_key_longer_than_255_is_refused(client: TestClient,
                                                    pg_world: World) -> None:
    grant(client)
    assert_problem(start(client, idem="k" * 256), 400)
    resp = client.post(GENERATIONS, json=body(), headers={**SVC, "Idempotency-Key": ""})
    assert_problem(resp, 400)
    assert count_generations(pg_world) == 0
    assert start(client, idem="k" * 255).status_code == 202


def test_same_key_same_body_replays_without_a_second_generation(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    first = start(client, idem="order-1")
    assert first.status_code == 202
    # the saga moves on; the replay is still the first response
    deliver_samples(pg_world, first.json()["id"])
    again = start(client, idem="order-1")
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.json()["state"] == "processing_samples"

    assert count_generations(pg_world) == 1
    assert pg_world.jobs() == []
    assert account(client)["balance"] == "9.75"  # one sample round, committed once
    assert account(client)["held"] == "0.00"


def test_same_key_different_body_is_409(client: TestClient, pg_world: World) -> None:
    grant(client)
    assert start(client, idem="order-2").status_code == 202
    resp = start(client, body(prompt="autumn sale"), idem="order-2")
    assert_problem(resp, 409, "idempotency_key_reused")
    assert count_generations(pg_world) == 1
    assert account(client)["held"] == "0.25"


def test_key_can_be_reused_after_a_422(client: TestClient, pg_world: World) -> None:
    grant(client)
    assert_invalid(start(client, body(prompt=""), idem="order-3"), "prompt")
    resp = start(client, body(), idem="order-3")
    assert resp.status_code == 202, resp.text
    assert count_generations(pg_world) == 1


def test_key_is_scoped_to_method_and_path(client: TestClient, pg_world: World) -> None:
    shared = {"Idempotency-Key": "shared-key"}
    resp = client.post("/api/v1/accounts/u-42/grants", json={"amount": "5.00", "reason": "r"},
                       headers={**SVC, **shared})
    assert resp.status_code == 201
    resp = client.post("/api/v1/accounts/u-7/grants", json={"amount": "5.00", "reason": "r"},
                       headers={**SVC, **shared})
    assert resp.status_code == 201 and resp.json()["user_id"] == "u-7"
    gen = start(client, idem="shared-key")
    assert gen.status_code == 202, gen.text
    assert account(client, "u-42")["available"] == "4.75"
    assert account(client, "u-7")["balance"] == "5.00"
    # the grant with that key replays, it does not grant twice
    resp = client.post("/api/v1/accounts/u-42/grants", json={"amount": "5.00", "reason": "r"},
                       headers={**SVC, **shared})
    assert resp.status_code == 201
    assert account(client, "u-42")["balance"] == "5.00"


def test_402_is_replayed(client: TestClient, pg_world: World) -> None:
    first = start(client, idem="poor")
    problem = assert_problem(first, 402, "insufficient_credits")
    grant(client)
    again = start(client, idem="poor")
    assert_problem(again, 402, "insufficient_credits")
    assert again.json() == problem
    assert count_generations(pg_world) == 0
    assert pg_world.jobs() == []
    assert account(client)["held"] == "0.00"
    # a fresh key is evaluated anew
    assert start(client, idem="rich").status_code == 202


def test_insufficient_credits_dispatches_nothing(client: TestClient, pg_world: World) -> None:
    assert_problem(start(client), 402, "insufficient_credits")  # no account at all
    grant(client, amount="0.24")
    assert_problem(start(client), 402, "insufficient_credits")
    assert pg_world.jobs() == []
    assert count_generations(pg_world) == 0
    assert account(client) == {"user_id": "u-42", "plan": "free", "balance": "0.24",
                               "held": "0.00", "available": "0.24"}


def test_free_plan_monthly_quota(client: TestClient, pg_world: World) -> None:
    svc = pg_world
    svc.bus.handle(Grant("u-42", Decimal("50.00"), "seed"))
    fmt = {"name": "instagram_post", "width": 1080, "height": 1080}
    ids = [svc.bus.handle(StartGeneration(user_id="u-42", prompt=f"p{i}", format=fmt))["id"]
           for i in range(100)]
    pg_world.jobs()
    assert_problem(start(client), 402, "quota_exceeded")
    assert account(client)["held"] == "25.00"

    # a released round no longer counts
    svc.bus.handle(Cancel(ids[0]))
    assert start(client).status_code == 202
    assert_problem(start(client), 402, "quota_exceeded")

    # the quota is per calendar month (UTC)
    pg_world.clock.advance(31 * 24 * 3600)
    assert start(client).status_code == 202


# ------------------------------------------------------------------ request validation
INVALID_STARTS: list[tuple[str, Any, str]] = [
    ("unknown top-level field", body(colour="red"), "colour"),
    ("unknown style field", body(style={"tone": "x", "mood": "y"}), "style.mood"),
    ("unknown brand field", body(brand={"colors": [], "font": "Arial"}), "brand.font"),
    ("sample_count as string", body(sample_count="4"), "sample_count"),
    ("prompt as number", body(prompt=5), "prompt"),
    ("user_id as number", body(user_id=42), "user_id"),
    ("metadata as list", body(metadata=[1]), "metadata"),
    ("missing prompt", {k: v for k, v in body().items() if k != "prompt"}, "prompt"),
    ("missing user_id", {k: v for k, v in body().items() if k != "user_id"}, "user_id"),
    ("missing format", {k: v for k, v in body().items() if k != "format"}, "format"),
    ("empty prompt", body(prompt=""), "prompt"),
    ("prompt over 4000", body(prompt="x" * 4001), "prompt"),
    ("empty user_id", body(user_id=""), "user_id"),
    ("user_id over 64", body(user_id="u" * 65), "user_id"),
    ("unknown format", body(format="instagram_square"), "format"),
    ("custom without width", body(format="custom", height=500), "width"),
    ("custom without height", body(format="custom", width=500), "height"),
    ("custom width 63", body(format="custom", width=63, height=500), "width"),
    ("custom height 4097", body(format="custom", width=500, height=4097), "height"),
    ("width for a named format", body(width=800), "width"),
    ("sample_count 0", body(sample_count=0), "sample_count"),
    ("sample_count 5", body(sample_count=5), "sample_count"),
    ("six input assets", body(input_assets=[f"https://x.io/{i}.png" for i in range(6)]),
     "input_assets"),
    ("non-URL input asset", body(input_assets=["ftp://x.io/a.png"]), "input_assets"),
    ("relative input asset", body(input_assets=["a.png"]), "input_assets"),
    ("sample_count as boolean", body(sample_count=True), "sample_count"),
    ("sample_count as float", body(sample_count=2.0), "sample_count"),
    ("negative_prompt over 4000", body(negative_prompt="x" * 4001), "negative_prompt"),
    ("logo_url not a URL", body(brand={"colors": [], "logo_url": "logo.png"}),
     "brand.logo_url"),
    ("metadata over 4 KB", body(metadata={"blob": "x" * 4200}), "metadata"),
    ("bad brand colour", body(brand={"colors": ["orange"]}), "brand.colors"),
    ("brand colour without #", body(brand={"colors": ["FF6B35"]}), "brand.colors"),
]


@pytest.mark.parametrize(("payload", "field"), [(p, f) for _, p, f in INVALID_STARTS],
                         ids=[name for name, _, _ in INVALID_STARTS])
def test_invalid_start_is_422(client: TestClient, pg_world: World, payload: Any,
                              field: str) -> None:
    grant(client)
    assert_invalid(start(client, payload), field)
    assert count_generations(pg_world) == 0


@pytest.mark.parametrize("raw", [
    b"{not json", b"", b"\xff\xfe", json.dumps([body()]).encode(), b'"a string"', b"null",
], ids=["garbage", "empty", "not-utf8", "array", "string", "null"])
def test_start_body_that_is_not_a_json_object_is_422(client: TestClient, pg_world: World,
                                                     raw: bytes) -> None:
    resp = client.post(GENERATIONS, content=raw,
                       headers={**SVC, **key(), "Content-Type": "application/json"})
    assert_invalid(resp, "body")
    assert count_generations(pg_world) == 0


def test_boundary_values_are_accepted(client: TestClient) -> None:
    grant(client, "u" * 64)
    gen = start_ok(client, prompt="x" * 4000, user_id="u" * 64, sample_count=1,
                   input_assets=[f"s3://bucket/{i}.png" for i in range(4)]
                   + ["http://x.io/a.png"],
                   metadata={"blob": "x" * 3900}, brand={"colors": ["#fff", "#A1B2C3"]})
    assert len(gen["prompt"]) == 4000 and gen["metadata"] == {"blob": "x" * 3900}


def test_metadata_size_counts_utf8_bytes(client: TestClient) -> None:
    """About 3 KB of UTF-8 JSON is within the 4 KB limit, whatever the script."""
    grant(client)
    metadata = {"note": "é" * 1000, "title": "日本語" * 100}
    assert len(json.dumps(metadata, ensure_ascii=False).encode()) < 3000
    resp = start(client, body(metadata=metadata))
    assert resp.status_code == 202, resp.text
    assert resp.json()["metadata"] == metadata


def test_body_over_64_kb_is_413(client: TestClient, pg_world: World) -> None:
    grant(client)
    resp = start(client, body(negative_prompt=None, metadata={"blob": "x" * 70_000}))
    assert_problem(resp, 413)
    assert count_generations(pg_world) == 0


# ------------------------------------------------------------------ GET /generations/{id}
def test_get_generation_for_both_roles(client: TestClient) -> None:
    grant(client)
    gen = start_ok(client)
    for headers in (SVC, SUP):
        resp = client.get(f"{GENERATIONS}/{gen['id']}", headers=headers)
        assert resp.status_code == 200
        assert resp.json() == gen


def test_get_unknown_generation_is_404(client: TestClient) -> None:
    for headers in (SVC, SUP):
        assert_problem(client.get(f"{GENERATIONS}/{uuid.uuid4()}", headers=headers), 404,
                       "not_found")
    assert_problem(client.get(f"{GENERATIONS}/not-a-uuid", headers=SVC), 404, "not_found")


# ------------------------------------------------------------------ selection
def test_selection_holds_the_final_and_dispatches_it(client: TestClient,
                                                     pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    pg_world.clock.advance(30)
    resp = choose(client, gen_id, {"sample_id": "s3", "resolution": "standard"},
                  headers=key())
    assert resp.status_code == 202, resp.text
    gen = resp.json()
    assert gen["state"] == "processing_final"
    assert gen["selected_sample_id"] == "s3"
    assert gen["credits"] == {"held": "1.00", "charged": "0.25", "released": "0.00"}
    assert parse_time(gen["deadline_at"]) == pg_world.clock.now + timedelta(seconds=600)
    assert account(client) == {"user_id": "u-42", "plan": "free", "balance": "9.75",
                               "held": "1.00", "available": "8.75"}
    job = only_job(pg_world, gen_id)
    assert job["stage"] == "final" and job["selected_sample"]["sample_id"] == "s3"
    assert job["output"] == {"width": 2048, "height": 2048, "format": "png"}
    assert [h.stage for h in holds_of(pg_world, gen_id)].count("final") == 1

    deliver_final(pg_world, gen_id, job)
    done = get(client, gen_id)
    assert done["state"] == "completed" and done["deadline_at"] is None
    assert done["final_asset"]["url"] == "s3://creativeflow-assets/final.png"
    assert done["credits"] == {"held": "0.00", "charged": "1.25", "released": "0.00"}


def test_selection_high_resolution_default_and_replay(client: TestClient,
                                                      pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    headers = {"Idempotency-Key": "sel-1"}
    first = choose(client, gen_id, {"sample_id": "s1", "resolution": "high"}, headers=headers)
    assert first.status_code == 202
    assert first.json()["credits"]["held"] == "2.00"
    assert only_job(pg_world, gen_id)["output"]["width"] == 4096
    again = choose(client, gen_id, {"sample_id": "s1", "resolution": "high"}, headers=headers)
    assert again.status_code == 202 and again.json() == first.json()
    assert account(client)["held"] == "2.00"
    assert pg_world.jobs() == []
    # resolution defaults to standard
    other = awaiting_selection(client, pg_world, user_id="u-43")
    resp = choose(client, other, {"sample_id": "s1"})
    assert resp.status_code == 202 and resp.json()["credits"]["held"] == "1.00"


def test_selection_in_the_wrong_state_is_409(client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    problem = assert_problem(choose(client, gen["id"]), 409, "invalid_state")
    assert get(client, gen["id"])["state"] == "processing_samples"
    assert account(client)["held"] == "0.25"
    deliver_samples(pg_world, gen["id"])
    assert choose(client, gen["id"]).status_code == 202
    assert_problem(choose(client, gen["id"]), 409, "invalid_state")
    assert problem["code"] == "invalid_state"
    assert [h.stage for h in holds_of(pg_world, gen["id"])].count("final") == 1


def test_selection_of_an_unknown_sample_is_422(client: TestClient, pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    resp = choose(client, gen_id, {"sample_id": "s9", "resolution": "standard"},
                  headers={"Idempotency-Key": "sel-2"})
    problem = assert_problem(resp, 422, "unknown_sample")
    assert "sample_id" in [e["field"] for e in problem["errors"]]
    assert get(client, gen_id)["state"] == "awaiting_selection"
    assert account(client)["held"] == "0.00"
    # a 422 is not stored: the corrected body may reuse the key
    resp = choose(client, gen_id, {"sample_id": "s1", "resolution": "standard"},
                  headers={"Idempotency-Key": "sel-2"})
    assert resp.status_code == 202, resp.text


@pytest.mark.parametrize(("payload", "field"), [
    ({"sample_id": "s1", "resolution": "ultra"}, "resolution"),
    ({"resolution": "standard"}, "sample_id"),
    ({"sample_id": 1}, "sample_id"),
    ({"sample_id": "s1", "extra": True}, "extra"),
    ([], "body"),
])
def test_selection_schema_is_422(client: TestClient, pg_world: World, payload: Any,
                                 field: str) -> None:
    gen_id = awaiting_selection(client, pg_world)
    assert_invalid(choose(client, gen_id, payload), field)
    assert get(client, gen_id)["state"] == "awaiting_selection"


def test_selection_that_cannot_be_paid_is_402(client: TestClient, pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world, balance="0.25")
    resp = choose(client, gen_id, headers={"Idempotency-Key": "sel-3"})
    assert_problem(resp, 402, "insufficient_credits")
    assert get(client, gen_id)["state"] == "awaiting_selection"
    assert pg_world.jobs() == []
    assert [h.stage for h in holds_of(pg_world, gen_id)] == ["samples"]
    # a 402 is stored under its key
    grant(client, amount="5.00")
    assert_problem(choose(client, gen_id, headers={"Idempotency-Key": "sel-3"}), 402,
                   "insufficient_credits")
    assert choose(client, gen_id).status_code == 202


def test_selection_of_unknown_generation_is_404(client: TestClient) -> None:
    assert_problem(choose(client, str(uuid.uuid4())), 404, "not_found")


# ------------------------------------------------------------------ regenerate
def test_regenerate_starts_a_new_round_with_a_new_hold(client: TestClient,
                                                       pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    pg_world.clock.advance(60)
    resp = client.post(f"{GENERATIONS}/{gen_id}/regenerate", json={"prompt": "more pastel"},
                       headers={**SVC, **key()})
    assert resp.status_code == 202, resp.text
    gen = resp.json()
    assert gen["state"] == "processing_samples"
    assert gen["prompt"] == "more pastel" and gen["samples"] == []
    assert gen["attempt"] == 1
    assert gen["credits"] == {"held": "0.25", "charged": "0.25", "released": "0.00"}
    assert parse_time(gen["deadline_at"]) == pg_world.clock.now + timedelta(seconds=120)
    job = only_job(pg_world, gen_id)
    assert job["stage"] == "samples" and job["prompt"] == "more pastel"
    sample_holds = holds_of(pg_world, gen_id)
    assert [(h.stage, h.status) for h in sample_holds] == [("samples", "committed"),
                                                           ("samples", "open")]
    assert account(client) == {"user_id": "u-42", "plan": "free", "balance": "9.75",
                               "held": "0.25", "available": "9.50"}


@pytest.mark.parametrize("send", [
    {},
    {"content": b""},
    {"json": {}},
    {"json": {"prompt": None}},
], ids=["no body", "empty body", "empty object", "null prompt"])
def test_regenerate_without_a_prompt_keeps_it(client: TestClient, pg_world: World,
                                              send: dict[str, Any]) -> None:
    gen_id = awaiting_selection(client, pg_world)
    resp = client.post(f"{GENERATIONS}/{gen_id}/regenerate", headers=SVC, **send)
    assert resp.status_code == 202, resp.text
    assert resp.json()["state"] == "processing_samples"
    assert resp.json()["prompt"] == "spring sale banner, pastel"
    assert only_job(pg_world, gen_id)["prompt"] == "spring sale banner, pastel"


def test_regenerate_refusals(client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    url = f"{GENERATIONS}/{gen['id']}/regenerate"
    assert_problem(client.post(url, headers=SVC), 409, "invalid_state")
    assert_invalid(client.post(url, json={"prompt": ""}, headers=SVC), "prompt")
    assert_invalid(client.post(url, json={"promt": "x"}, headers=SVC), "promt")
    assert_problem(client.post(f"{GENERATIONS}/{uuid.uuid4()}/regenerate", headers=SVC), 404,
                   "not_found")
    assert [h.stage for h in holds_of(pg_world, gen["id"])] == ["samples"]

    # processing_final and terminal states refuse too
    pg_world.jobs()
    other = awaiting_selection(client, pg_world, user_id="u-43")
    assert choose(client, other).status_code == 202
    url = f"{GENERATIONS}/{other}/regenerate"
    assert_problem(client.post(url, headers=SVC), 409, "invalid_state")
    assert client.post(f"{GENERATIONS}/{other}/cancel", headers=SVC).status_code == 200
    assert_problem(client.post(url, headers=SVC), 409, "invalid_state")
    assert_problem(choose(client, other), 409, "invalid_state")
    assert sorted(h.stage for h in holds_of(pg_world, other)) == ["final", "samples"]


def test_regenerate_that_cannot_be_paid_is_402(client: TestClient, pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world, balance="0.25")
    resp = client.post(f"{GENERATIONS}/{gen_id}/regenerate", headers=SVC)
    assert_problem(resp, 402, "insufficient_credits")
    assert get(client, gen_id)["state"] == "awaiting_selection"
    assert pg_world.jobs() == []


# ------------------------------------------------------------------ cancel
@pytest.mark.parametrize("send", [{}, {"content": b""}, {"json": {"reason": "customer"}}],
                         ids=["no body", "empty body", "reason"])
def test_cancel_releases_the_open_hold(client: TestClient, pg_world: World,
                                       send: dict[str, Any]) -> None:
    grant(client)
    gen = start_ok(client)
    resp = client.post(f"{GENERATIONS}/{gen['id']}/cancel", headers=SVC, **send)
    assert resp.status_code == 200, resp.text
    cancelled = resp.json()
    assert cancelled["state"] == "cancelled" and cancelled["deadline_at"] is None
    assert cancelled["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    assert account(client) == {"user_id": "u-42", "plan": "free", "balance": "10.00",
                               "held": "0.00", "available": "10.00"}
    assert [h.status for h in holds_of(pg_world, gen["id"])] == ["released"]


def test_cancel_during_the_final_releases_the_final_hold(client: TestClient,
                                                        pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    assert choose(client, gen_id).status_code == 202
    resp = client.post(f"{GENERATIONS}/{gen_id}/cancel", headers=SVC)
    assert resp.status_code == 200
    assert resp.json()["credits"] == {"held": "0.00", "charged": "0.25", "released": "1.00"}
    assert account(client)["balance"] == "9.75" and account(client)["held"] == "0.00"


def test_cancel_in_a_terminal_state_is_409(client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    url = f"{GENERATIONS}/{gen['id']}/cancel"
    assert client.post(url, headers=SVC).status_code == 200
    assert_problem(client.post(url, headers=SVC), 409, "invalid_state")
    assert account(client)["balance"] == "10.00"
    pg_world.jobs()

    done = awaiting_selection(client, pg_world, user_id="u-43")
    assert choose(client, done).status_code == 202
    deliver_final(pg_world, done)
    assert_problem(client.post(f"{GENERATIONS}/{done}/cancel", headers=SVC), 409,
                   "invalid_state")
    assert get(client, done)["state"] == "completed"
    assert_problem(client.post(f"{GENERATIONS}/{uuid.uuid4()}/cancel", headers=SVC), 404,
                   "not_found")
    assert_invalid(client.post(url, json={"why": "x"}, headers=SVC), "why")


def test_cancel_replays_under_its_key(client: TestClient) -> None:
    grant(client)
    gen = start_ok(client)
    url = f"{GENERATIONS}/{gen['id']}/cancel"
    first = client.post(url, headers={**SVC, "Idempotency-Key": "c-1"})
    again = client.post(url, headers={**SVC, "Idempotency-Key": "c-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert_problem(client.post(url, json={"reason": "other"},
                               headers={**SVC, "Idempotency-Key": "c-1"}),
                   409, "idempotency_key_reused")


# ------------------------------------------------------------------ GET /generations (support)
def test_list_is_newest_first_and_filters(client: TestClient, pg_world: World) -> None:
    grant(client, "u-a")
    grant(client, "u-b")
    created = []
    for user in ("u-a", "u-b", "u-a", "u-b"):
        created.append(start_ok(client, user_id=user)["id"])
        pg_world.clock.advance(1)
    pg_world.jobs()
    assert client.post(f"{GENERATIONS}/{created[2]}/cancel", headers=SVC).status_code == 200

    resp = client.get(GENERATIONS, headers=SUP)
    assert resp.status_code == 200
    page = resp.json()
    assert [g["id"] for g in page["items"]] == created[::-1]
    assert page["next_cursor"] is None
    assert all(set(g) >= GENERATION_FIELDS for g in page["items"])

    by_user = client.get(GENERATIONS, params={"user_id": "u-a"}, headers=SUP).json()
    assert [g["id"] for g in by_user["items"]] == [created[2], created[0]]
    by_state = client.get(GENERATIONS, params={"state": "cancelled"}, headers=SUP).json()
    assert [g["id"] for g in by_state["items"]] == [created[2]]
    both = client.get(GENERATIONS, params={"user_id": "u-a", "state": "processing_samples"},
                      headers=SUP).json()
    assert [g["id"] for g in both["items"]] == [created[0]]
    none = client.get(GENERATIONS, params={"user_id": "nobody"}, headers=SUP).json()
    assert none == {"items": [], "next_cursor": None}


def test_cursor_pagination_walks_everything_once(client: TestClient, pg_world: World) -> None:
    grant(client)
    created = []
    for i in range(7):
        created.append(start_ok(client)["id"])
        if i % 2:  # some generations share a created_at: the cursor must break ties
            pg_world.clock.advance(1)
    pg_world.jobs()

    seen: list[str] = []
    pages = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        resp = client.get(GENERATIONS, params=params, headers=SUP)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages.append(len(page["items"]))
        seen += [g["id"] for g in page["items"]]
        cursor = page["next_cursor"]
        if len(pages) == 1:  # a newer generation arriving meanwhile does not shift pages
            pg_world.clock.advance(5)
            start_ok(client)
        if cursor is None:
            break
        assert isinstance(cursor, str) and cursor
        assert len(pages) < 10
    assert pages == [3, 3, 1]
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == set(created)
    times = [parse_time(get(client, i)["created_at"]) for i in seen]
    assert times == sorted(times, reverse=True)

    # 8 now: a page that ends exactly at the last item has no cursor to an empty page
    resp = client.get(GENERATIONS, params={"limit": 8}, headers=SUP).json()
    assert len(resp["items"]) == 8 and resp["next_cursor"] is None
    resp = client.get(GENERATIONS, params={"limit": 100}, headers=SUP)
    assert resp.status_code == 200 and len(resp.json()["items"]) == 8
    resp = client.get(GENERATIONS, params={"limit": 1}, headers=SUP)
    assert len(resp.json()["items"]) == 1 and resp.json()["next_cursor"]


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"),
    ({"limit": 101}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"cursor": "garbage!!"}, "cursor"),
    ({"cursor": _b64("[1, 2, 3]")}, "cursor"),
    ({"cursor": _b64('["2026-11-02T12:00:00", "x"]')}, "cursor"),
    ({"state": "done"}, "state"),
    ({"user_id": "u" * 65}, "user_id"),
])
def test_list_refusals_are_422(client: TestClient, params: dict[str, Any], field: str) -> None:
    assert_invalid(client.get(GENERATIONS, params=params, headers=SUP), field)


# ------------------------------------------------------------------ history (support)
def test_history_records_every_step_in_order(client: TestClient, pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    assert choose(client, gen_id, {"sample_id": "s1", "resolution": "high"}).status_code == 202
    assert_problem(choose(client, gen_id), 409, "invalid_state")  # refused: recorded too
    final_job = only_job(pg_world, gen_id)
    asset = {"url": "s3://creativeflow-assets/f.png", "width": 4096, "height": 4096,
             "format": "png"}
    result = ApplyResult("AIGenerationFinalAssetReady", gen_id, final_job["job_id"], asset=asset)
    assert pg_world.bus.handle(result) == "applied"
    assert pg_world.bus.handle(result) == "duplicate"

    resp = client.get(f"{GENERATIONS}/{gen_id}/history", headers=SUP)
    assert resp.status_code == 200
    data = resp.json()
    assert data["id"] == gen_id and data["state"] == "completed"
    events = data["events"]
    for event in events:
        assert set(event) >= {"seq", "at", "kind", "trigger", "from_state", "to_state",
                              "actor", "detail"}
        assert event["kind"] in {"transition", "credit", "message_in", "message_out",
                                 "rejected", "note"}
        assert event["actor"] in {"odoo", "n8n", "timer", "support", "system"}
        assert isinstance(event["detail"], dict)
        parse_time(event["at"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    transitions = [e for e in events if e["kind"] == "transition"]
    assert [(e["trigger"], e["from_state"], e["to_state"], e["actor"]) for e in transitions] == [
        ("start", "requested", "processing_samples", "odoo"),
        ("samples_ready", "processing_samples", "awaiting_selection", "n8n"),
        ("select", "awaiting_selection", "processing_final", "odoo"),
        ("final_ready", "processing_final", "completed", "n8n"),
    ]
    credits = [e["detail"] for e in events if e["kind"] == "credit"]
    assert [(c["op"], c["stage"], c["amount"]) for c in credits] == [
        ("reserve", "samples", "0.25"), ("commit", "samples", "0.25"),
        ("reserve", "final", "2.00"), ("commit", "final", "2.00"),
    ]
    assert credits[0]["hold_id"] == credits[1]["hold_id"]
    assert credits[2]["hold_id"] == credits[3]["hold_id"] != credits[0]["hold_id"]

    rejected = [e for e in events if e["kind"] == "rejected"]
    assert len(rejected) == 2 and all(e["detail"].get("reason") for e in rejected)
    assert rejected[-1]["detail"]["reason"] == "duplicate"
    assert rejected[-1]["actor"] == "n8n"
    kinds = [e["kind"] for e in events]
    assert kinds.count("message_in") == 3  # samples, final, duplicate final
    jobs_out = [e for e in events if e["kind"] == "message_out"
                and e["detail"].get("event_type") == "AIGenerationJobRequested"]
    assert len(jobs_out) == 2
    # causality: the start's reserve comes after its transition and before its job
    first_reserve = kinds.index("credit")
    assert kinds.index("transition") < first_reserve < kinds.index("message_out")


def test_history_of_unknown_generation_is_404(client: TestClient) -> None:
    assert_problem(client.get(f"{GENERATIONS}/{uuid.uuid4()}/history", headers=SUP), 404,
                   "not_found")


# ------------------------------------------------------------------ accounts
def test_account_get_and_404(client: TestClient) -> None:
    for headers in (SVC, SUP):
        assert_problem(client.get("/api/v1/accounts/ghost", headers=headers), 404, "not_found")
    grant(client, amount="3.5")
    for headers in (SVC, SUP):
        resp = client.get("/api/v1/accounts/u-42", headers=headers)
        assert resp.status_code == 200
        assert resp.json() == {"user_id": "u-42", "plan": "free", "balance": "3.50",
                               "held": "0.00", "available": "3.50"}


def test_put_plan_creates_and_updates(client: TestClient) -> None:
    resp = client.put("/api/v1/accounts/u-new", json={"plan": "team"}, headers=SVC)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"user_id": "u-new", "plan": "team", "balance": "0.00",
                           "held": "0.00", "available": "0.00"}
    grant(client, "u-new", "7.00")
    resp = client.put("/api/v1/accounts/u-new", json={"plan": "enterprise"}, headers=SVC)
    assert resp.status_code == 200
    assert resp.json()["plan"] == "enterprise" and resp.json()["balance"] == "7.00"
    assert account(client, "u-new")["plan"] == "enterprise"


@pytest.mark.parametrize(("payload", "field"), [
    ({"plan": "gold"}, "plan"),
    ({"plan": None}, "plan"),
    ({}, "plan"),
    ({"plan": "pro", "tier": 1}, "tier"),
])
def test_put_plan_refusals(client: TestClient, payload: Any, field: str) -> None:
    resp = client.put("/api/v1/accounts/u-42", json=payload, headers=SVC)
    assert_invalid(resp, field)
    assert_problem(client.get("/api/v1/accounts/u-42", headers=SVC), 404, "not_found")


def test_grant_creates_a_free_account(client: TestClient) -> None:
    resp = client.post("/api/v1/accounts/u-9/grants", json={"amount": "10.5", "reason": "promo"},
                       headers={**SVC, **key()})
    assert resp.status_code == 201, resp.text
    data = resp.json()
    assert {k: data[k] for k in ("user_id", "plan", "balance", "held", "available")} == {
        "user_id": "u-9", "plan": "free", "balance": "10.50", "held": "0.00",
        "available": "10.50"}
    grant(client, "u-9", "0.01")
    assert account(client, "u-9")["balance"] == "10.51"
    # a grant keeps the plan of an existing account
    client.put("/api/v1/accounts/u-9", json={"plan": "pro"}, headers=SVC)
    assert grant(client, "u-9", "1.00")["plan"] == "pro"


@pytest.mark.parametrize(("payload", "field"), [
    ({"amount": 10, "reason": "r"}, "amount"),
    ({"amount": 10.5, "reason": "r"}, "amount"),
    ({"amount": "-1.00", "reason": "r"}, "amount"),
    ({"amount": "0.00", "reason": "r"}, "amount"),
    ({"amount": "0", "reason": "r"}, "amount"),
    ({"amount": "1.005", "reason": "r"}, "amount"),
    ({"amount": "1e3", "reason": "r"}, "amount"),
    ({"amount": "ten", "reason": "r"}, "amount"),
    ({"amount": "1.00"}, "reason"),
    ({"amount": "1.00", "reason": ""}, "reason"),
    ({"reason": "r"}, "amount"),
])
def test_grant_refusals(client: TestClient, payload: Any, field: str) -> None:
    resp = client.post("/api/v1/accounts/u-42/grants", json=payload, headers=SVC)
    assert_invalid(resp, field)
    assert_problem(client.get("/api/v1/accounts/u-42", headers=SVC), 404, "not_found")


def test_account_paths_check_the_user_id(client: TestClient) -> None:
    long_id = "u" * 65
    assert_invalid(client.put(f"/api/v1/accounts/{long_id}", json={"plan": "pro"},
                              headers=SVC), "user_id")
    assert_invalid(client.post(f"/api/v1/accounts/{long_id}/grants",
                               json={"amount": "1.00", "reason": "r"}, headers=SVC), "user_id")


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


def test_an_unexpected_error_is_a_problem_response_not_a_bare_500(pg_world: World) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("a bug")

    app = create_app(ApiDeps(bus=pg_world.bus, queries=Broken(),  # type: ignore[arg-type]
                             api_keys=API_KEYS))
    with TestClient(app, raise_server_exceptions=False) as lenient:
        resp = lenient.get("/api/v1/generations/x", headers=SVC)
    assert resp.status_code == 500
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "internal_error" and "bug" not in resp.text
