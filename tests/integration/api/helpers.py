"""What the API tests share: keys, request builders, n8n played by hand, assertions.

The app runs on the real message bus (``pg_world``); n8n is played through
``pg_world.bus.handle(ApplyResult(...))``; the jobs it would receive come from
``pg_world.jobs()``.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select

from persistence.tables import generations, holds
from saga.commands import ApplyResult
from tests.conftest import World

SVC = {"Authorization": "Bearer svc-key"}
SUP = {"Authorization": "Bearer sup-key"}
API_KEYS = {"svc-key": "service", "sup-key": "support"}
GENERATIONS = "/api/v1/generations"

GENERATION_FIELDS = {
    "id", "state", "user_id", "project_id", "prompt", "format", "sample_count", "samples",
    "selected_sample_id", "final_asset", "credits", "error", "attempt", "deadline_at",
    "created_at", "updated_at", "metadata", "attention",
}
AMOUNT = re.compile(r"^\d+\.\d{2}$")
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}



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

