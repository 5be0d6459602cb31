"""Support reads: the generation list with its cursor, and the history."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from saga.commands import ApplyResult
from tests.conftest import World
from tests.integration.api.helpers import (
    GENERATION_FIELDS,
    GENERATIONS,
    SUP,
    SVC,
    assert_invalid,
    assert_problem,
    awaiting_selection,
    choose,
    get,
    grant,
    only_job,
    parse_time,
    start_ok,
)

pytestmark = pytest.mark.integration


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
