"""Dead letters and unroutable messages through the real RabbitMQ into the service's store."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pika
import pytest
from sqlalchemy import select

from persistence.tables import dead_letters
from saga.messages import OutboundMessage
from standins.n8n import wait_for
from tests.integration.rabbit_fixtures import SUPPORT, Running

pytestmark = pytest.mark.integration


def _rows(running: Running, **where: Any) -> list[Any]:
    query = select(dead_letters)
    for column, value in where.items():
        query = query.where(dead_letters.c[column] == value)
    with running.engine.connect() as conn:
        return list(conn.execute(query))


def test_an_unroutable_event_is_parked_stored_and_replayed_once_a_queue_exists(
        running: Running) -> None:
    url = running.runtime.settings.amqp_url or ""
    key = f"nobody.listens.{uuid.uuid4().hex[:6]}"
    event_id = str(uuid.uuid4())
    body = {"event_type": "GenerationStateChanged", "event_id": event_id,
            "generation_id": str(uuid.uuid4()), "to_state": "completed"}
    confirmed = running.runtime.broker.publish([OutboundMessage(
        "creativeflow.events", key, event_id, body["generation_id"],
        "GenerationStateChanged", body)])
    assert confirmed == [True]  # unroutable is still confirmed by RabbitMQ
    wait_for(lambda: _rows(running, routing_key=key), message="the parked message stored")
    [row] = _rows(running, routing_key=key)
    assert row.reason.startswith("unroutable") and row.exchange == "creativeflow.events"
    assert json.loads(row.body) == body and row.generation_id == body["generation_id"]

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, "creativeflow.events", key)
        resp = running.client.post(f"/api/v1/dead-letters/{row.id}/replay",
                                   json={"reason": "the consumer is bound now"},
                                   headers=SUPPORT)
        assert resp.status_code == 202, resp.text
        got: list[bytes] = []

        def received() -> bool:
            method, _props, payload = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                got.append(payload)
            return bool(got)
        wait_for(received, message="the replayed message")
        assert json.loads(got[0]) == body
    finally:
        conn.close()
    [after] = _rows(running, routing_key=key)
    assert after.status == "replayed" and after.resolved_by == "support"


def test_a_message_rabbitmq_dead_letters_itself_keeps_its_routing_key(
        running: Running) -> None:
    """A result the broker rejected (x-death, no x-rejection-reason) is stored too."""
    url = running.runtime.settings.amqp_url or ""
    message_id = str(uuid.uuid4())
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        # Through the DLX as RabbitMQ does: x-death names the queue, exchange and key.
        death = {"count": 1, "reason": "rejected", "queue": "orchestrator.generation.results",
                 "exchange": "creativeflow.generation",
                 "routing-keys": ["generation.result.failed"]}
        channel.basic_publish("creativeflow.dlx", "generation.result.failed", b'{"x": 1}',
                              pika.BasicProperties(message_id=message_id, delivery_mode=2,
                                                   headers={"x-death": [death]}))
    finally:
        conn.close()
    wait_for(lambda: _rows(running, message_key=f"dlq:{message_id}"), message="the row")
    [row] = _rows(running, message_key=f"dlq:{message_id}")
    assert (row.exchange, row.routing_key) == ("creativeflow.generation",
                                               "generation.result.failed")
    assert row.reason == "rejected by RabbitMQ: rejected" and row.generation_id is None
