"""The RabbitMQ :class:`~messaging.broker.Broker`: one publisher, one consumer per queue."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from messaging.broker import ORIGINAL_ROUTING_KEY, BatchHandler, Delivery, Disposition
from messaging.rabbitmq.connection import declare
from messaging.rabbitmq.consumer import QueueConsumer
from messaging.rabbitmq.publisher import AsyncPublisher, properties
from saga.messages import DEAD_LETTER_EXCHANGE, OutboundMessage
from saga.retry import RetryPolicy

log = logging.getLogger(__name__)


class RabbitBroker:
    def __init__(self, url: str, *, prefetch: int = 200, workers: int = 4,
                 on_unroutable: Callable[[str, str], None] | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self.url = url
        self.prefetch = prefetch
        self.workers = workers
        self.retry = retry  # reconnect backoff (the budget does not apply: never give up)
        self.publisher = AsyncPublisher(url, on_unroutable=on_unroutable, retry=retry)
        self.consumers: list[QueueConsumer] = []

    def start(self) -> None:
        try:
            self.declare()
        except Exception as exc:  # the consumer declares again on every (re)connect
            log.warning("RabbitMQ not reachable at start-up (%s); will keep trying", exc)
        self.publisher.start()

    def declare(self) -> None:
        declare(self.url)

    def publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        return self.publisher.publish(messages)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = {**delivery.headers, "x-rejection-reason": reason[:1000],
                   ORIGINAL_ROUTING_KEY: delivery.routing_key}
        # A message id of its own when the producer set none: the dead-letter store tells a
        # redelivery of this copy from another message with the same body by it.
        props = properties(delivery.message_id or str(uuid.uuid4()), None, None, headers)
        if not self.publisher.publish_raw(DEAD_LETTER_EXCHANGE, delivery.routing_key,
                                          delivery.body, props):
            raise ConnectionError("dead-letter publish was not confirmed")

    def redeliver(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        # Straight to the queue it came from (default exchange), not through the topic
        # exchange again: no other binding sees it twice. Its routing key travels in a header.
        if delivery.queue is None:
            raise ValueError("a delivery without its queue cannot be redelivered")
        props = properties(delivery.message_id, None, None, {
            **delivery.headers, **headers, ORIGINAL_ROUTING_KEY: delivery.routing_key})
        if not self.publisher.publish_raw("", delivery.queue, delivery.body, props):
            raise ConnectionError("redelivery publish was not confirmed")

    def consume(self, queue: str, handler: Callable[[Delivery], Disposition]) -> None:
        consumer = QueueConsumer(self.url, queue, handler, prefetch=self.prefetch,
                                 workers=self.workers, retry=self.retry)
        consumer.start()
        self.consumers.append(consumer)

    def consume_batches(self, queue: str, handler: BatchHandler, *, max_batch: int) -> None:
        consumer = QueueConsumer(self.url, queue, prefetch=self.prefetch, workers=self.workers,
                                 retry=self.retry, batch_handler=handler, max_batch=max_batch)
        consumer.start()
        self.consumers.append(consumer)

    def healthy(self) -> bool:
        return self.publisher.connected and all(c.connected.is_set() for c in self.consumers)

    def stop(self) -> None:
        for consumer in self.consumers:
            consumer.stop()
        self.publisher.stop()

    close = stop  # the name the first adapters used
