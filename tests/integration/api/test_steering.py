"""Reading one generation and steering it: selection, regenerate, cancel."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import World
from tests.integration.api.helpers import (
    GENERATIONS,
    SUP,
    SVC,
    account,
    assert_invalid,
    assert_problem,
    awaiting_selection,
    choose,
    deliver_final,
    deliver_samples,
    get,
    grant,
    holds_of,
    key,
    only_job,
    parse_time,
    start_ok,
)

pytestmark = pytest.mark.integration


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
