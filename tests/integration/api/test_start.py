"""POST /generations: starting a generation, idempotency and request validation."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from saga.commands import Cancel, Grant, StartGeneration
from tests.conftest import World
from tests.integration.api.helpers import (
    AMOUNT,
    GENERATION_FIELDS,
    GENERATIONS,
    SVC,
    account,
    assert_invalid,
    assert_problem,
    body,
    count_generations,
    deliver_samples,
    get,
    grant,
    history,
    holds_of,
    key,
    only_job,
    parse_time,
    start,
    start_ok,
)

pytestmark = pytest.mark.integration


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
    ("non-URL input asset", body(input_assets=["ftp://x.io/a.png"]), "input_assets.0"),
    ("relative input asset", body(input_assets=["a.png"]), "input_assets.0"),
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
