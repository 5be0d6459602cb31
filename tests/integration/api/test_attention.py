"""Parked sagas for support: ``GET /api/v1/attention`` and ``POST …/support/retry``."""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient
from httpx import Response

from aigen.jobs.dead_letters import DeadLetterDrain
from messaging.broker import Delivery
from messaging.consumer import ResultConsumer
from saga.commands import FireDeadlines, Park
from saga.messages import DEAD_LETTER_QUEUE, RESULTS_QUEUE
from saga.observer import NullObserver
from tests.conftest import World
from tests.integration.api.helpers import (
    GENERATIONS,
    SUP,
    SVC,
    get,
    grant,
    history,
    only_job,
    samples,
    start_ok,
)

ATTENTION = "/api/v1/attention"


def park(world: World, gen_id: str, kind: str = "timer", reason: str = "boom") -> None:
    assert world.bus.handle(Park(gen_id, kind, reason)) is True


def retry(client: TestClient, gen_id: str, reason: str = "fixed it",
          key: str = "k-1") -> Response:
    return client.post(f"{GENERATIONS}/{gen_id}/support/retry", json={"reason": reason},
                       headers={**SUP, "Idempotency-Key": key})


def test_attention_lists_parked_sagas_oldest_first_in_pages(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    first, second, healthy = (start_ok(client) for _ in range(3))
    assert client.get(ATTENTION, headers=SUP).json() == {"items": [], "next_cursor": None}
    park(pg_world, first["id"], "compensation", "release refused")
    pg_world.clock.advance(5)
    park(pg_world, second["id"], "result", "bad result")
    assert pg_world.bus.handle(Park(first["id"], "timer", "again")) is False  # parked once

    page = client.get(ATTENTION, params={"limit": 1}, headers=SUP).json()
    assert [(i["generation_id"], i["attention"]["kind"]) for i in page["items"]] == [
        (first["id"], "compensation")]
    assert page["items"][0]["user_id"] == "u-42"
    assert page["items"][0]["state"] == "processing_samples"
    rest = client.get(ATTENTION, params={"limit": 1, "cursor": page["next_cursor"]},
                      headers=SUP).json()
    assert [i["generation_id"] for i in rest["items"]] == [second["id"]]
    assert rest["next_cursor"] is None
    assert get(client, first["id"])["attention"]["reason"] == "release refused"
    assert get(client, healthy["id"])["attention"] is None
    notes = [e for e in history(client, first["id"]) if e["kind"] == "note"]
    assert [(n["actor"], n["detail"]["kind"]) for n in notes] == [("system", "compensation")]


def test_attention_refuses_bad_limits_cursors_and_the_service_role(client: TestClient) -> None:
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "nope"}):
        r = client.get(ATTENTION, params=params, headers=SUP)
        assert r.status_code == 422 and r.json()["code"] == "validation_error", params
    assert client.get(ATTENTION, headers=SVC).status_code == 403


def test_support_retry_runs_the_parked_timer_now(client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    park(pg_world, gen["id"], "timer", "firing kept failing")
    pg_world.clock.advance(200)  # the samples deadline has passed…
    assert pg_world.bus.handle(FireDeadlines()) == 0  # …but a parked saga is skipped
    assert get(client, gen["id"])["state"] == "processing_samples"

    r = retry(client, gen["id"], "the row was repaired")
    assert r.status_code == 200, r.text
    assert r.json()["attention"] is None
    again = retry(client, gen["id"], "the row was repaired")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert pg_world.bus.handle(FireDeadlines()) == 1
    assert get(client, gen["id"])["state"] == "timed_out"
    notes = [e for e in history(client, gen["id"]) if e["kind"] == "note"]
    assert (notes[-1]["actor"], notes[-1]["detail"]["reason"]) == (
        "support", "the row was repaired")


def test_support_retry_refusals(client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    unknown = retry(client, "00000000-0000-0000-0000-000000000000", key="k-2")
    assert unknown.status_code == 404
    nothing = retry(client, gen["id"], key="k-3")
    assert nothing.status_code == 409
    assert nothing.json()["code"] == "invalid_state"
    for reason in ("", "x" * 501):
        r = retry(client, gen["id"], reason, key=f"k-{len(reason)}")
        assert r.status_code == 422, reason
    no_key = client.post(f"{GENERATIONS}/{gen['id']}/support/retry", json={"reason": "x"},
                         headers=SVC)
    assert no_key.status_code == 403


def test_the_console_offers_retry_only_when_parked_and_it_works(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    form = client.get("/console/sign-in").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token is not None
    assert client.post("/console/sign-in", data={"csrf_token": token.group(1),
                                                 "api_key": "sup-key"},
                       follow_redirects=False).status_code == 303
    page = client.get(f"/console/generations/{gen['id']}").text
    assert "Retry now" not in page
    park(pg_world, gen["id"], "timer", "stuck")
    page = client.get(f"/console/generations/{gen['id']}").text
    assert "Retry now" in page and "stuck" in page
    assert "stuck" in client.get("/console/").text  # the attention list
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    done = client.post(f"/console/generations/{gen['id']}/retry",
                       data={"csrf_token": csrf.group(1), "reason": "looked at it"},
                       follow_redirects=False)
    assert done.status_code == 303
    assert get(client, gen["id"])["attention"] is None


def test_retrying_a_parked_result_leaves_the_sagas_own_deadline_alone(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    park(pg_world, gen["id"], "result", "processing_error: BillingRefused")
    assert retry(client, gen["id"], "billing fixed; replaying the result").status_code == 200
    assert pg_world.bus.handle(FireDeadlines()) == 0  # the samples deadline is still ahead
    after = get(client, gen["id"])
    assert after["state"] == "processing_samples"
    assert after["deadline_at"] == gen["deadline_at"] and after["attention"] is None


def _dead_letter(world: World, body: bytes, reason: str, message_id: str) -> None:
    """Dead-letter ``body`` as the result consumer does, then drain the DLQ into the store."""
    world.broker.dead_letter(Delivery(body, "generation.result.samples_ready", message_id),
                             reason)
    handle = DeadLetterDrain(world.bus, world.broker, world.clock).handler(DEAD_LETTER_QUEUE)
    q = world.broker.queues[DEAD_LETTER_QUEUE]
    while not q.empty():
        handle(q.get_nowait())


def test_retrying_a_parked_result_replays_the_result_that_parked_it(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    job = only_job(pg_world, gen["id"])
    body = json.dumps({"event_type": "AIGenerationSamplesReady", "generation_id": gen["id"],
                       "job_id": job["job_id"], "samples": samples()}).encode()
    # What the consumer does when applying a result fails for good: park, then dead-letter.
    reason = "processing_error: BillingRefused: billing refused to commit h-1 with HTTP 422"
    park(pg_world, gen["id"], "result", reason)
    _dead_letter(pg_world, body, reason, "m-1")
    # A result that never parsed is not the parked step: a replay would only fail again.
    _dead_letter(pg_world, json.dumps({"generation_id": gen["id"]}).encode(),
                 "schema: event_type is missing", "m-2")

    r = retry(client, gen["id"], "billing fixed")
    assert r.status_code == 200, r.text
    assert r.json()["attention"] is None
    pg_world.pump()
    [replayed] = list(pg_world.broker.queues[RESULTS_QUEUE].queue)
    assert replayed.body == body and replayed.routing_key == "generation.result.samples_ready"
    ResultConsumer(pg_world.bus, pg_world.broker, NullObserver()).handle(
        pg_world.broker.queues[RESULTS_QUEUE].get_nowait())
    assert get(client, gen["id"])["state"] == "awaiting_selection"

    letters = client.get("/api/v1/dead-letters", params={"status": "all"},
                         headers=SUP).json()["items"]
    status = {item["reason"].split(":")[0]: item for item in letters}
    assert status["processing_error"]["status"] == "replayed"
    assert status["processing_error"]["resolved_reason"] == "billing fixed"
    assert status["schema"]["status"] == "open"
    [note] = [e for e in history(client, gen["id"])
              if e["kind"] == "note" and e["detail"].get("unparked")]
    assert note["detail"]["replayed_dead_letters"] == [status["processing_error"]["id"]]


def test_retrying_a_parked_result_whose_letter_is_gone_only_clears_the_attention(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    park(pg_world, gen["id"], "result", "processing_error: forced")
    r = retry(client, gen["id"], "already replayed by hand")
    assert r.status_code == 200 and r.json()["attention"] is None
    pg_world.pump()
    assert pg_world.broker.queues[RESULTS_QUEUE].empty()
    [note] = [e for e in history(client, gen["id"])
              if e["kind"] == "note" and e["detail"].get("unparked")]
    assert note["detail"]["replayed_dead_letters"] == []
