"""Support's actions over REST on PostgreSQL: cancel, resolve a stuck hold, dead letters."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from aigen.jobs.dead_letters import DeadLetterDrain
from api.app import ApiDeps, create_app
from messaging.broker import Delivery
from messaging.consumer import ResultConsumer
from messaging.inprocess import InProcessBroker
from persistence.external_billing import ExternalBilling, HttpBillingClient
from persistence.tables import dead_letters
from saga.commands import ApplyResult, FireDeadlines
from saga.messages import DEAD_LETTER_QUEUE, RESULTS_QUEUE, UNROUTABLE_QUEUE
from saga.observer import NullObserver
from standins.billing import BillingStandIn
from tests.conftest import FakeClock, World
from tests.integration.api.helpers import (
    API_KEYS,
    GENERATIONS,
    SUP,
    SVC,
    assert_invalid,
    assert_problem,
    awaiting_selection,
    get,
    grant,
    history,
    holds_of,
    only_job,
    samples,
    start_ok,
)

pytestmark = pytest.mark.integration
DL = "/api/v1/dead-letters"


def post(client: TestClient, path: str, payload: Any, headers: dict[str, str] | None = None
         ) -> Any:
    return client.post(path, json=payload, headers={**SUP, **(headers or {})})


# ------------------------------------------------------------------ cancel
def test_support_cancel_releases_the_hold_and_records_support_and_the_reason(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    resp = post(client, f"{GENERATIONS}/{gen['id']}/support/cancel",
                {"reason": "customer asked by phone"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "cancelled"
    assert resp.json()["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    assert [h.status for h in holds_of(pg_world, gen["id"])] == ["released"]
    last = [e for e in history(client, gen["id"]) if e["kind"] == "transition"][-1]
    assert (last["trigger"], last["actor"], last["to_state"]) == ("cancel", "support",
                                                                  "cancelled")
    assert last["detail"]["reason"] == "customer asked by phone"


def test_support_cancel_refusals(client: TestClient, pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    path = f"{GENERATIONS}/{gen_id}/support/cancel"
    assert_problem(client.post(path, json={"reason": "x"}), 401, "unauthorized")
    assert_problem(client.post(path, json={"reason": "x"}, headers=SVC), 403, "forbidden")
    assert_invalid(post(client, path, {}), "reason")
    assert_invalid(post(client, path, {"reason": "   "}), "reason")
    assert_invalid(post(client, path, {"reason": "r" * 501}), "reason")
    assert_invalid(post(client, path, {"reason": "ok", "extra": 1}), "extra")
    assert_problem(post(client, f"{GENERATIONS}/{uuid.uuid4()}/support/cancel",
                        {"reason": "x"}), 404, "not_found")
    assert get(client, gen_id)["state"] == "awaiting_selection"  # nothing above changed it
    assert post(client, path, {"reason": "first"}).status_code == 200
    before = history(client, gen_id)
    assert_problem(post(client, path, {"reason": "again"}), 409, "invalid_state")
    assert history(client, gen_id) == before  # a refusal changes nothing


def test_support_cancel_replays_its_idempotency_key(client: TestClient,
                                                    pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    path = f"{GENERATIONS}/{gen['id']}/support/cancel"
    idem = {"Idempotency-Key": "support-cancel-1"}
    first = post(client, path, {"reason": "dup"}, idem)
    again = post(client, path, {"reason": "dup"}, idem)
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert_problem(post(client, path, {"reason": "other"}, idem), 409,
                   "idempotency_key_reused")


# ------------------------------------------------------------------ resolve (external billing)
@pytest.fixture
def ext(pg_engine: Engine, clock: FakeClock, billing: BillingStandIn
        ) -> Iterator[tuple[TestClient, World]]:
    http = HttpBillingClient(billing.url, timeout=0.5, attempts=2, backoff=0.01)
    world = World(pg_engine, clock, billing_factory=functools.partial(ExternalBilling,
                                                                       client=http))
    app = create_app(ApiDeps(bus=world.bus, queries=world.queries, api_keys=API_KEYS))
    with TestClient(app) as test_client:
        yield test_client, world
    http.close()


def _stuck_compensating(client: TestClient, world: World, billing: BillingStandIn) -> str:
    """A samples failure whose release billing keeps refusing: stuck in compensating."""
    billing.open_account("u-42", "free", "10.00")
    gen = start_ok(client)
    job = only_job(world, gen["id"])
    billing.down = True
    outcome = world.bus.handle(ApplyResult("AIGenerationFailed", gen["id"], job["job_id"],
                                           error={"code": "bad_prompt", "message": "no",
                                                  "retryable": False}))
    assert outcome == "applied"
    world.clock.advance(5)
    assert world.bus.handle(FireDeadlines()) == 1  # the release is retried and fails again
    assert get(client, gen["id"])["state"] == "compensating"
    return str(gen["id"])


def test_resolve_released_lands_the_saga_where_it_was_headed_without_calling_billing(
        ext: tuple[TestClient, World], billing: BillingStandIn) -> None:
    client, world = ext
    gen_id = _stuck_compensating(client, world, billing)
    [hold] = holds_of(world, gen_id)
    # A person releases it in the billing system (it keeps failing for us).
    billing.down = False
    assert billing.handle("POST", f"/holds/{hold.hold_id}/release", {})[0] == 200
    billing.down = True
    calls = billing.calls
    path = f"{GENERATIONS}/{gen_id}/support/resolve"
    resp = post(client, path, {"reason": "released by hand in Odoo (ticket 42)",
                               "hold_id": hold.hold_id, "outcome": "released"})
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["state"] == "failed" and view["error"]["code"] == "bad_prompt"
    assert view["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    assert billing.calls == calls  # billing was not asked
    assert [h.status for h in holds_of(world, gen_id)] == ["released"]
    events = history(client, gen_id)
    last = [e for e in events if e["kind"] == "transition"][-1]
    assert (last["trigger"], last["actor"], last["from_state"], last["to_state"]) == (
        "compensated", "support", "compensating", "failed")
    assert last["detail"]["reason"] == "released by hand in Odoo (ticket 42)"
    assert any(e["kind"] == "credit" and e["actor"] == "support"
               and e["detail"]["op"] == "release" for e in events)
    assert [n["type"] for n in world.published("creativeflow.notifications")] == ["failed"]
    # Resolving again: the hold is no longer open.
    assert_problem(post(client, path, {"reason": "again", "hold_id": hold.hold_id,
                                       "outcome": "released"}), 409, "invalid_state")
    # Billing comes back: no timer retries the release; the hold settled exactly once.
    billing.down = False
    world.clock.advance(120)
    assert world.bus.handle(FireDeadlines()) == 0
    assert billing.status_counts() == {"released": 1} and billing.violations == []


def test_resolve_committed_charges_the_hold(ext: tuple[TestClient, World],
                                            billing: BillingStandIn) -> None:
    client, world = ext
    gen_id = _stuck_compensating(client, world, billing)
    [hold] = holds_of(world, gen_id)
    resp = post(client, f"{GENERATIONS}/{gen_id}/support/resolve",
                {"reason": "billing shows it committed", "hold_id": hold.hold_id,
                 "outcome": "committed"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "failed"
    assert resp.json()["credits"] == {"held": "0.00", "charged": "0.25", "released": "0.00"}
    assert [h.status for h in holds_of(world, gen_id)] == ["committed"]


def test_resolve_refusals(ext: tuple[TestClient, World], billing: BillingStandIn) -> None:
    client, world = ext
    gen_id = _stuck_compensating(client, world, billing)
    [hold] = holds_of(world, gen_id)
    path = f"{GENERATIONS}/{gen_id}/support/resolve"
    ok = {"reason": "checked", "hold_id": hold.hold_id, "outcome": "released"}
    assert_problem(client.post(path, json=ok), 401, "unauthorized")
    assert_problem(client.post(path, json=ok, headers=SVC), 403, "forbidden")
    assert_invalid(post(client, path, {**ok, "outcome": "maybe"}), "outcome")
    assert_invalid(post(client, path, {**ok, "reason": ""}), "reason")
    assert_invalid(post(client, path, {"reason": "x", "outcome": "released"}), "hold_id")
    assert_problem(post(client, f"{GENERATIONS}/{uuid.uuid4()}/support/resolve", ok), 404,
                   "not_found")
    assert_problem(post(client, path, {**ok, "hold_id": str(uuid.uuid4())}), 409,
                   "invalid_state")
    assert get(client, gen_id)["state"] == "compensating"
    assert [h.status for h in holds_of(world, gen_id)] == ["open"]


def test_resolve_is_refused_when_nothing_is_stuck(client: TestClient, pg_world: World) -> None:
    gen_id = awaiting_selection(client, pg_world)
    [hold] = holds_of(pg_world, gen_id)
    assert_problem(post(client, f"{GENERATIONS}/{gen_id}/support/resolve",
                        {"reason": "x", "hold_id": hold.hold_id, "outcome": "released"}),
                   409, "invalid_state")
    assert [h.status for h in holds_of(pg_world, gen_id)] == ["committed"]


# ------------------------------------------------------------------ dead letters
def _dead_letter(world: World, body: bytes, reason: str, message_id: str | None = None,
                 routing_key: str = "generation.result.samples_ready") -> None:
    """Dead-letter ``body`` as the result consumer does, then drain the DLQ into the store."""
    world.broker.dead_letter(Delivery(body, routing_key, message_id), reason)
    _drain(world, DEAD_LETTER_QUEUE)


def _drain(world: World, queue: str) -> None:
    handle = DeadLetterDrain(world.bus, world.broker, world.clock).handler(queue)
    q = world.broker.queues[queue]
    while not q.empty():
        handle(q.get_nowait())


def _samples_body(gen_id: str, job_id: str) -> bytes:
    return json.dumps({"event_type": "AIGenerationSamplesReady", "generation_id": gen_id,
                       "job_id": job_id, "samples": samples()}).encode()


def test_a_dead_lettered_result_is_listed_replayed_and_applied(
        client: TestClient, pg_world: World) -> None:
    grant(client)
    gen = start_ok(client)
    job = only_job(pg_world, gen["id"])
    _dead_letter(pg_world, _samples_body(gen["id"], job["job_id"]),
                 "processing_error: forced", message_id="m-1")
    _dead_letter(pg_world, _samples_body(gen["id"], job["job_id"]),
                 "processing_error: forced", message_id="m-1")  # the same delivery again
    page = client.get(DL, headers=SUP)
    assert page.status_code == 200, page.text
    [item] = page.json()["items"]
    assert {"id", "dead_lettered_at", "reason", "routing_key", "generation_id",
            "body_preview"} <= set(item)
    assert item["reason"] == "processing_error: forced"
    assert item["routing_key"] == "generation.result.samples_ready"
    assert item["generation_id"] == gen["id"]
    assert json.loads(item["body_preview"])["job_id"] == job["job_id"]

    resp = post(client, f"{DL}/{item['id']}/replay", {"reason": "the bug is fixed"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "replayed"
    pg_world.pump()
    [replayed] = list(pg_world.broker.queues[RESULTS_QUEUE].queue)
    assert replayed.routing_key == "generation.result.samples_ready"
    consumer = ResultConsumer(pg_world.bus, pg_world.broker, NullObserver())
    consumer.handle(pg_world.broker.queues[RESULTS_QUEUE].get_nowait())
    assert get(client, gen["id"])["state"] == "awaiting_selection"
    notes = [e for e in history(client, gen["id"]) if e["kind"] == "note"]
    assert any(n["actor"] == "support" and n["detail"]["action"] == "replay_dead_letter"
               and n["detail"]["reason"] == "the bug is fixed" for n in notes)
    assert client.get(DL, headers=SUP).json()["items"] == []
    assert_problem(post(client, f"{DL}/{item['id']}/replay", {"reason": "twice"}), 409,
                   "invalid_state")
    assert_problem(post(client, f"{DL}/{item['id']}/discard", {"reason": "late"}), 409,
                   "invalid_state")
    [all_item] = client.get(DL, params={"status": "all"}, headers=SUP).json()["items"]
    assert all_item["status"] == "replayed" and all_item["resolved_by"] == "support"


def test_discard_and_an_unreadable_body(client: TestClient, pg_world: World) -> None:
    _dead_letter(pg_world, b"\xff\xfe not json", "not_json: the body is not UTF-8 JSON")
    [item] = client.get(DL, headers=SUP).json()["items"]
    assert item["generation_id"] is None and item["body_preview"].endswith("not json")
    # Replaying it would only dead-letter it again.
    assert_problem(post(client, f"{DL}/{item['id']}/replay", {"reason": "try"}), 409,
                   "invalid_state")
    resp = post(client, f"{DL}/{item['id']}/discard", {"reason": "garbage from a test"})
    assert resp.status_code == 200 and resp.json()["status"] == "discarded"
    with pg_world.engine.connect() as conn:
        row = conn.execute(select(dead_letters)).one()
    assert (row.status, row.resolved_reason) == ("discarded", "garbage from a test")
    assert_problem(post(client, f"{DL}/{item['id']}/discard", {"reason": "again"}), 409,
                   "invalid_state")


def test_dead_letter_refusals_and_paging(client: TestClient, pg_world: World) -> None:
    for n in range(3):
        _dead_letter(pg_world, b'{"n": %d}' % n, f"schema: case {n}")
        pg_world.clock.advance(1)
    first = client.get(DL, params={"limit": 2}, headers=SUP).json()
    assert [i["reason"] for i in first["items"]] == ["schema: case 2", "schema: case 1"]
    rest = client.get(DL, params={"limit": 2, "cursor": first["next_cursor"]},
                      headers=SUP).json()
    assert [i["reason"] for i in rest["items"]] == ["schema: case 0"]
    assert rest["next_cursor"] is None
    assert_problem(client.get(DL), 401, "unauthorized")
    assert_problem(client.get(DL, headers=SVC), 403, "forbidden")
    assert_invalid(client.get(DL, params={"limit": 0}, headers=SUP), "limit")
    assert_invalid(client.get(DL, params={"limit": 101}, headers=SUP), "limit")
    assert_invalid(client.get(DL, params={"cursor": "nope"}, headers=SUP), "cursor")
    assert_invalid(client.get(DL, params={"status": "lost"}, headers=SUP), "status")
    missing = str(uuid.uuid4())
    assert_problem(post(client, f"{DL}/{missing}/replay", {"reason": "x"}), 404, "not_found")
    assert_problem(post(client, f"{DL}/{missing}/discard", {"reason": "x"}), 404, "not_found")
    some = first["items"][0]["id"]
    assert_invalid(post(client, f"{DL}/{some}/replay", {}), "reason")
    assert_problem(client.post(f"{DL}/{some}/discard", json={"reason": "x"}, headers=SVC),
                   403, "forbidden")


def test_an_unroutable_notification_is_kept_and_replayed_to_its_exchange(
        pg_engine: Engine, clock: FakeClock) -> None:
    world = World(pg_engine, clock, broker=InProcessBroker(keep_unroutable=True))
    app = create_app(ApiDeps(bus=world.bus, queries=world.queries, api_keys=API_KEYS))
    with TestClient(app) as client:
        grant(client)
        gen = start_ok(client)
        world.pump()  # its state-changed event has no queue bound for it
        _drain(world, UNROUTABLE_QUEUE)
        items = client.get(DL, headers=SUP).json()["items"]
        event = next(i for i in items if i["exchange"] == "creativeflow.events")
        assert event["reason"].startswith("unroutable")
        assert event["routing_key"] == "generation.processing_samples"
        assert event["generation_id"] == gen["id"]
        # The consumer now exists: bind a queue and replay.
        bound = world.broker.declare_queue("odoo.events", [("creativeflow.events", "#")])
        resp = post(client, f"{DL}/{event['id']}/replay", {"reason": "Odoo queue is up"})
        assert resp.status_code == 202, resp.text
        world.pump()
        delivered = json.loads(bound.get_nowait().body)
        assert delivered["to_state"] == "processing_samples"
        assert delivered["generation_id"] == gen["id"]
