"""Poison results on the real RabbitMQ and PostgreSQL: dead-lettered once, never looping.

Deeply nested and unparseable bodies go to the DLX with a reason exactly once while valid
results keep flowing; a result whose processing keeps failing transiently is republished
with ``x-aigen-attempts`` until the budget is spent, then dead-lettered once and its saga
parked; a permanent failure (a saga row that does not load) parks at once.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pika
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from persistence.tables import dead_letters, generations
from saga.commands import ApplyResult
from saga.messagebus import HANDLERS
from saga.messages import RESULTS_QUEUE
from standins.n8n import Collector, Reply, ScriptedN8n, publish_raw, wait_for
from tests.integration.rabbit_fixtures import SUPPORT, Running

pytestmark = pytest.mark.integration

DEEP = b'{"a":' * 1200 + b"1" + b"}" * 1200  # 2.4 KB, 1,200 levels
SAMPLES = [{"sample_id": f"s{i}", "url": f"s3://creativeflow-assets/s{i}.png",
            "width": 512, "height": 512} for i in range(1, 5)]


def queue_depth(url: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(RESULTS_QUEUE, passive=True)
                   .method.message_count)
    finally:
        conn.close()


def job_id_of(running: Running, gid: str) -> str:
    with running.engine.connect() as conn:
        body = conn.execute(select(generations.c.body).where(generations.c.id == gid)).scalar()
    return str(body["job_id"])


def dead(running: Running) -> list[tuple[dict[str, str], bytes]]:
    """What the service's dead-letter store holds (it drains the DLQ): (reason, body)."""
    with running.engine.connect() as conn:
        rows = conn.execute(select(dead_letters.c.reason, dead_letters.c.body).where(
            dead_letters.c.reason.not_like("unroutable%"))).all()
    return [({"x-rejection-reason": r.reason}, bytes(r.body)) for r in rows]


def samples_result(gid: str, job_id: str) -> bytes:
    return json.dumps({"event_type": "AIGenerationSamplesReady", "generation_id": gid,
                       "job_id": job_id, "samples": SAMPLES}).encode()


def test_deep_and_unparseable_results_are_dead_lettered_once_while_valid_ones_flow(
        running: Running) -> None:
    url = running.runtime.settings.amqp_url or ""
    running.grant("p-1", "10.00")
    poison = [DEEP] * 8 + [b"\xff\xfe not utf-8", b'{"event_type": ']
    with Collector(url), ScriptedN8n(url, lambda job: [Reply("samples_ready",
                                                                     delay=0.2)]):
        for body in poison:
            publish_raw(url, "generation.result.samples_ready", body)
        gens = [running.start("p-1", f"p1-{i}") for i in range(5)]
        for gen in gens:
            running.wait_state(gen["id"], "awaiting_selection", timeout=20)
        wait_for(lambda: len(dead(running)) >= len(poison), message="every poison dead-lettered")
        time.sleep(1.0)  # anything requeued would come back and be dead-lettered again
        reasons = sorted(h["x-rejection-reason"].split(":")[0] for h, _ in dead(running))
    assert reasons == ["not_json"] * 2 + ["schema"] * 8  # each exactly once
    deep = [h["x-rejection-reason"] for h, b in dead(running) if b == DEEP]
    assert all("nested deeper than 32 levels" in r for r in deep)
    assert queue_depth(url) == 0  # nothing left unacked or requeued


def test_a_transient_failure_is_republished_within_the_budget_then_parked(
        running_with: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    running = running_with(retry_max_attempts=2, retry_base_s=0.05, retry_jitter=0)
    url = running.runtime.settings.amqp_url or ""
    running.grant("p-2", "10.00")
    gen = running.start("p-2", "p2")
    calls: list[dict[str, Any]] = []
    original = HANDLERS[ApplyResult]

    def database_down(ctx: Any, cmd: ApplyResult, idem: Any) -> Any:
        if cmd.generation_id != gen["id"]:
            return original(ctx, cmd, idem)
        calls.append(cmd.__dict__)
        raise OperationalError("UPDATE generations", {}, Exception("server closed"))

    monkeypatch.setitem(HANDLERS, ApplyResult, database_down)
    with Collector(url):
        publish_raw(url, "generation.result.samples_ready",
                    samples_result(gen["id"], job_id_of(running, gen["id"])))
        wait_for(lambda: len(dead(running)) == 1, message="the dead letter")
        time.sleep(0.5)
        assert len(dead(running)) == 1
    headers, _ = dead(running)[0]
    assert headers["x-rejection-reason"].startswith("retry_budget_exhausted: 2 retries")
    assert len(calls) == 3  # the first try and two retries, no more
    monkeypatch.setitem(HANDLERS, ApplyResult, original)

    parked = running.get(gen["id"])
    assert parked["state"] == "processing_samples"  # keeps its state and its hold
    assert parked["credits"]["held"] == "0.25"
    assert parked["attention"]["kind"] == "result"
    assert parked["attention"]["reason"].startswith("retry_budget_exhausted")
    listed = running.client.get("/api/v1/attention", headers=SUPPORT).json()
    assert [i["generation_id"] for i in listed["items"]] == [gen["id"]]

    r = running.client.post(f"/api/v1/generations/{gen['id']}/support/retry",
                            json={"reason": "database back"},
                            headers={**SUPPORT, "Idempotency-Key": "retry-1"})
    assert r.status_code == 200, r.text
    assert r.json()["attention"] is None
    notes = [e for e in running.history(gen["id"]) if e["kind"] == "note"]
    assert [(n["actor"], n["detail"].get("reason")) for n in notes][-1] == (
        "support", "database back")


def test_a_result_for_a_saga_that_cannot_be_loaded_parks_it_at_once(
        running: Running) -> None:
    url = running.runtime.settings.amqp_url or ""
    running.grant("p-3", "10.00")
    gen = running.start("p-3", "p3")
    job_id = job_id_of(running, gen["id"])
    with running.engine.begin() as conn:
        conn.execute(update(generations).where(generations.c.id == gen["id"])
                     .values(body={"broken": True}))
    with Collector(url):
        publish_raw(url, "generation.result.samples_ready", samples_result(gen["id"], job_id))
        wait_for(lambda: len(dead(running)) == 1, message="the dead letter")
        time.sleep(0.5)
        assert len(dead(running)) == 1
    assert dead(running)[0][0]["x-rejection-reason"].startswith("processing_error")
    with running.engine.connect() as conn:
        row = conn.execute(select(generations).where(generations.c.id == gen["id"])).one()
    assert (row.attention_kind, row.state) == ("result", "processing_samples")
    listed = running.client.get("/api/v1/attention", headers=SUPPORT).json()["items"]
    assert [(i["generation_id"], i["attention"]["kind"]) for i in listed] == [
        (gen["id"], "result")]


def test_a_result_waiting_for_its_retry_does_not_hold_up_the_healthy_ones(
        running_with: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker (the default): a result that failed transiently waits out a 3 s backoff
    while the results published after it are applied; only then is it republished."""
    running = running_with(retry_max_attempts=2, retry_base_s=3.0, retry_jitter=0)
    assert running.runtime.settings.consumer_workers == 1
    url = running.runtime.settings.amqp_url or ""
    running.grant("p-4", "10.00")
    slow = running.start("p-4", "p4-slow")
    healthy = [running.start("p-4", f"p4-{i}") for i in range(5)]
    events: list[str] = []
    original = HANDLERS[ApplyResult]

    def billing_busy_once(ctx: Any, cmd: ApplyResult, idem: Any) -> Any:
        if cmd.generation_id == slow["id"] and "failed" not in events:
            events.append("failed")
            raise OperationalError("UPDATE generations", {}, Exception("server closed"))
        return original(ctx, cmd, idem)

    broker = running.runtime.broker
    republish = broker.redeliver

    def recorded_redeliver(delivery: Any, headers: dict[str, Any]) -> None:
        events.append("republished")
        republish(delivery, headers)

    monkeypatch.setitem(HANDLERS, ApplyResult, billing_busy_once)
    monkeypatch.setattr(broker, "redeliver", recorded_redeliver)
    with Collector(url):
        publish_raw(url, "generation.result.samples_ready",
                    samples_result(slow["id"], job_id_of(running, slow["id"])))
        wait_for(lambda: "failed" in events, message="the first try of the slow result")
        for gen in healthy:
            publish_raw(url, "generation.result.samples_ready",
                        samples_result(gen["id"], job_id_of(running, gen["id"])))
        for gen in healthy:
            running.wait_state(gen["id"], "awaiting_selection", timeout=20)
        # All five applied (in a batch, or one by one) while the slow one still waits for
        # its backoff, unacked: it has not been republished yet.
        assert events == ["failed"]
        assert running.get(slow["id"])["state"] == "processing_samples"
        running.wait_state(slow["id"], "awaiting_selection", timeout=20)
    assert events == ["failed", "republished"]
    assert running.get(slow["id"])["attention"] is None
    assert dead(running) == []
    assert queue_depth(url) == 0
