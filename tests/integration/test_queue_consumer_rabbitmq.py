"""The RabbitMQ consumer against a real broker: acks only what its handler finished, and
what was not finished when the connection dropped comes back after the reconnect.

The handler holds one delivery (its "transaction" has not committed) while the ones around it
finish and are acked — in batches, so with ``multiple`` acks where nothing below is open.
Then every connection of the vhost is closed: the held delivery, never acked, must come
back, marked redelivered, on the consumer's next connection; the finished ones must not.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pika
import pytest

from messaging.broker import Delivery, Disposition
from messaging.rabbitmq.connection import declare
from messaging.rabbitmq.consumer import QueueConsumer
from saga.messages import GENERATION_EXCHANGE, RESULTS_QUEUE
from saga.retry import RetryPolicy
from standins.n8n import wait_for
from tests.integration.test_rabbitmq import vhost_outage

pytestmark = pytest.mark.integration


def publish(url: str, ids: Sequence[str]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()  # no confirms: they go out in one burst, to arrive together
        for message_id in ids:
            ch.basic_publish(GENERATION_EXCHANGE, "generation.result.samples",
                             message_id.encode(),
                             pika.BasicProperties(message_id=message_id, delivery_mode=2))
    finally:
        conn.close()


def queue_depth(url: str) -> tuple[int, int]:
    """(ready, unacked) of the results queue, from the broker."""
    import subprocess
    vhost = pika.URLParameters(url).virtual_host
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers",
                          "name", "messages_ready", "messages_unacknowledged"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name, ready, unacked = line.split()
        if name == RESULTS_QUEUE:
            return int(ready), int(unacked)
    raise AssertionError(f"no {RESULTS_QUEUE} in {out!r}")


def test_only_finished_deliveries_are_acked_and_the_held_one_returns_after_a_reconnect(
        amqp_url: str, amqp_vhost: str) -> None:
    declare(amqp_url)
    release = threading.Event()
    seen: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def handler(deliveries: Sequence[Delivery]) -> list[Disposition]:
        out = []
        for d in deliveries:
            with lock:
                seen.append((d.message_id or "", d.redelivered))
            if d.message_id == "held" and not d.redelivered:
                release.wait(30)  # its transaction never commits on this connection
                out.append(Disposition.RETRY if release.is_set() else Disposition.ACK)
            else:
                out.append(Disposition.ACK)
        return out

    # Two workers: the held delivery blocks one, the other goes on acking its neighbours.
    consumer = QueueConsumer(amqp_url, RESULTS_QUEUE, prefetch=50, workers=2,
                             batch_handler=handler, max_batch=5,
                             retry=RetryPolicy(base=0.1, cap=0.5, jitter=0))
    consumer.start()
    try:
        assert consumer.connected.wait(15)
        before = [f"a-{n}" for n in range(8)]
        after = [f"b-{n}" for n in range(12)]
        publish(amqp_url, before)
        wait_for(lambda: len(seen) == 8, 15, message="the first deliveries seen")
        wait_for(lambda: queue_depth(amqp_url) == (0, 0), 15, message="the first acked")
        publish(amqp_url, ["held"])
        wait_for(lambda: ("held", False) in seen, 10, message="the held delivery taken")
        publish(amqp_url, after)  # acked above the held one: never a multiple ack over it
        wait_for(lambda: len(seen) == 21, 15, message="all deliveries seen")
        # Everything but the held one acked: the broker has exactly one unacked delivery.
        wait_for(lambda: queue_depth(amqp_url) == (0, 1), 15,
                 message="only the held delivery unacked")

        vhost_outage(amqp_vhost, 1.0)
        release.set()  # too late: its connection is gone, its settle goes nowhere
        wait_for(lambda: ("held", True) in seen, 30, message="the held delivery redelivered")
        wait_for(lambda: queue_depth(amqp_url) == (0, 0), 15, message="all acked")
        counts = {m: sum(1 for s, _ in seen if s == m) for m, _ in seen}
        assert counts.pop("held") == 2
        assert set(counts) == set(before + after) and set(counts.values()) == {1}
    finally:
        release.set()
        consumer.stop()
    assert not consumer.connected.is_set()


def test_stop_ends_the_session_promptly(amqp_url: str) -> None:
    declare(amqp_url)
    consumer = QueueConsumer(amqp_url, RESULTS_QUEUE, prefetch=10, workers=1,
                             batch_handler=lambda ds: [Disposition.ACK] * len(ds), max_batch=5)
    consumer.start()
    assert consumer.connected.wait(15)
    consumer.stop()
    assert not consumer._loop._thread.is_alive()  # its connection closed, its loop ended
    assert not consumer.connected.is_set()
