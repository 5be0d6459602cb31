"""Billing refusals (external billing stand-in on loopback, PostgreSQL): classified, not looped.

A commit the backend refuses for good (a 4xx) parks the saga after one try; one it cannot take
for now (503) is retried — in the call, then by redelivering the result within the budget —
and then parked. Either way the result is dead-lettered once and the saga keeps its hold.
"""

from __future__ import annotations

import json
import queue
from typing import Any

import pytest

from messaging.broker import Delivery
from messaging.consumer import ResultConsumer
from saga.messages import DEAD_LETTER_QUEUE, RESULTS_QUEUE
from saga.observer import NullObserver
from saga.retry import RetryPolicy
from standins.billing import BillingStandIn
from tests.conftest import World
from tests.integration.billing_flow import to_final

pytestmark = pytest.mark.integration
def deliver_until_settled(world: World, consumer: ResultConsumer, body: bytes) -> int:
    """Hand the result to the consumer, and every redelivery it makes; how many tries."""
    results = world.broker.queues[RESULTS_QUEUE]
    results.put(Delivery(body, "generation.result.final_ready", queue=RESULTS_QUEUE))
    tries = 0
    while True:
        try:
            delivery = results.get_nowait()
        except queue.Empty:
            return tries
        tries += 1
        consumer.handle(delivery)


def dead_letters(world: World) -> list[dict[str, Any]]:
    q = world.broker.queues[DEAD_LETTER_QUEUE]
    out = []
    while not q.empty():
        out.append(q.get_nowait().headers)
    return out


def final_body(gid: str, job_id: str) -> bytes:
    return json.dumps({"event_type": "AIGenerationFinalAssetReady", "generation_id": gid,
                       "job_id": job_id, "asset": {"url": "s3://b/f.png", "width": 2048,
                                                   "height": 2048}}).encode()


def test_a_permanently_refused_commit_parks_the_saga_after_one_try(
        ext_world: World, billing: BillingStandIn) -> None:
    gid, job_id = to_final(ext_world, billing)
    billing.refuse_commits_for.add("u-1")
    consumer = ResultConsumer(ext_world.bus, ext_world.broker, NullObserver(),
                              RetryPolicy(base=0, jitter=0, max_attempts=3))
    assert deliver_until_settled(ext_world, consumer, final_body(gid, job_id)) == 1
    assert billing.refused == 1  # one call: a 4xx is not retried
    (dead,) = dead_letters(ext_world)
    assert dead["x-rejection-reason"].startswith("processing_error: BillingRefused")
    saga = ext_world.queries.get(gid)
    assert saga["state"] == "processing_final" and saga["credits"]["held"] == "1.00"
    assert saga["attention"]["kind"] == "result"
    assert "HTTP 422" in saga["attention"]["reason"]


def test_a_commit_billing_cannot_take_now_is_retried_within_the_budget_then_parked(
        ext_world: World, billing: BillingStandIn) -> None:
    gid, job_id = to_final(ext_world, billing)
    billing.refuse_commits_for.add("u-1")
    billing.refusal_status = 503
    consumer = ResultConsumer(ext_world.bus, ext_world.broker, NullObserver(),
                              RetryPolicy(base=0, jitter=0, max_attempts=2))
    assert deliver_until_settled(ext_world, consumer, final_body(gid, job_id)) == 3
    assert billing.refused == 3 * 3  # three deliveries, each with the client's three calls
    (dead,) = dead_letters(ext_world)
    assert dead["x-rejection-reason"].startswith("retry_budget_exhausted: 2 retries")
    assert dead["x-aigen-attempts"] == 2
    saga = ext_world.queries.get(gid)
    assert saga["attention"]["kind"] == "result" and saga["state"] == "processing_final"
