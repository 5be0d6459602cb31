"""An in-process broker with the same contract as the RabbitMQ adapter.

For the embedded default (one process, no server) and unit tests: topic routing, durable-ish
FIFO queues, one consumer thread per queue (per message, or in batches of what is queued),
dead-lettering into the DLQ. A delivery a handler answered ``DEFERRED`` for is held, as
RabbitMQ holds an unacked one, until the handler settles it (RETRY puts it back in its
queue); :meth:`InProcessBroker.stop` puts the ones still held back, as a closed channel would.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from messaging.broker import (
    EXCHANGES,
    QUEUES,
    RETRY_PAUSE_S,
    BatchHandler,
    Delivery,
    Disposition,
    Settler,
    run_batch_handler,
    run_handler,
    topic_matches,
    unroutable_headers,
)
from saga.messages import DEAD_LETTER_EXCHANGE, UNROUTABLE_QUEUE, OutboundMessage


class InProcessBroker:
    """``keep_published=True`` (tests) keeps a copy of every message sent in ``published``;
    the embedded service leaves it off, so a long run does not grow without bound."""

    def __init__(self, *, keep_unroutable: bool = False, keep_published: bool = False) -> None:
        # The embedded mode runs no notification or Odoo consumer, so every notification
        # would be unroutable there: parking them is opt-in (tests), as RabbitMQ does always.
        self.keep_unroutable = keep_unroutable
        self.exchange_types = dict(EXCHANGES)
        self.bindings: list[tuple[str, str, str]] = []  # (exchange, pattern, queue)
        self.queues: dict[str, queue.Queue[Delivery]] = {}
        self.keep_published = keep_published
        self.published: list[OutboundMessage] = []  # what was sent, if keep_published
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        # Deliveries a handler deferred and has not settled yet: (queue, delivery, settler).
        self._held: dict[int, tuple[queue.Queue[Delivery], Delivery, Settler]] = {}
        self._held_lock = threading.Lock()
        for name, _args, binds in QUEUES:
            self.declare_queue(name, binds)

    def declare_queue(self, name: str, binds: list[tuple[str, str]]) -> queue.Queue[Delivery]:
        q = self.queues.setdefault(name, queue.Queue())
        for exchange, pattern in binds:
            self.bindings.append((exchange, pattern, name))
        return q

    def publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        for msg in messages:
            if self.keep_published:
                if msg.payload is not None and not msg.body:  # read back from the outbox
                    msg = dataclasses.replace(msg, body=json.loads(msg.payload))
                self.published.append(msg)
            routed = self.route(msg.exchange, msg.routing_key,
                                Delivery(msg.encode(), msg.routing_key, msg.message_id))
            if not routed and self.keep_unroutable:
                self.queues[UNROUTABLE_QUEUE].put(Delivery(
                    msg.encode(), UNROUTABLE_QUEUE, msg.message_id,
                    unroutable_headers(msg.exchange, msg.routing_key)))
        return [True] * len(messages)

    def route(self, exchange: str, routing_key: str, delivery: Delivery) -> int:
        fanout = self.exchange_types.get(exchange) == "fanout"
        routed = 0
        for ex, pattern, name in self.bindings:
            if ex == exchange and (fanout or topic_matches(pattern, routing_key)):
                self.queues[name].put(dataclasses.replace(delivery, queue=name))
                routed += 1
        return routed

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = {**delivery.headers, "x-rejection-reason": reason,
                   "x-original-routing-key": delivery.routing_key}
        self.route(DEAD_LETTER_EXCHANGE, delivery.routing_key,
                   Delivery(delivery.body, delivery.routing_key,
                            delivery.message_id or str(uuid.uuid4()), headers))

    def redeliver(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        if delivery.queue is None:
            raise ValueError("a delivery without its queue cannot be redelivered")
        self.queues[delivery.queue].put(dataclasses.replace(
            delivery, headers={**delivery.headers, **headers}, redelivered=False,
            settle=None))

    def _lend(self, q: queue.Queue[Delivery], delivery: Delivery) -> Settler:
        """Give ``delivery`` a settle hook for its handler: RETRY puts it back in ``q``."""

        def action(outcome: Disposition) -> None:
            with self._held_lock:
                self._held.pop(id(delivery), None)
            if outcome is Disposition.RETRY:
                delivery.redelivered = True
                q.put(delivery)

        settler = Settler(action)
        delivery.settle = settler
        return settler

    def _hold(self, q: queue.Queue[Delivery], delivery: Delivery, settler: Settler) -> None:
        """The handler deferred it: keep it until it is settled (or :meth:`stop`)."""
        with self._held_lock:
            if not settler.settled():  # a zero-delay retry may have settled it already
                self._held[id(delivery)] = (q, delivery, settler)

    def consume(self, queue_name: str, handler: Callable[[Delivery], Disposition]) -> None:
        q = self.queues[queue_name]

        def run() -> None:
            while not self._stop.is_set():
                try:
                    delivery = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                settler = self._lend(q, delivery)
                outcome = run_handler(handler, delivery)
                if outcome is Disposition.DEFERRED:
                    self._hold(q, delivery, settler)
                elif settler.claim() and outcome is Disposition.RETRY:
                    delivery.redelivered = True
                    self._stop.wait(RETRY_PAUSE_S)
                    q.put(delivery)

        thread = threading.Thread(target=run, name=f"consume-{queue_name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def consume_batches(self, queue_name: str, handler: BatchHandler, *,
                        max_batch: int) -> None:
        """Like :meth:`consume`; the handler gets what is queued, up to ``max_batch``."""
        q = self.queues[queue_name]

        def run() -> None:
            while not self._stop.is_set():
                try:
                    batch = [q.get(timeout=0.2)]
                except queue.Empty:
                    continue
                while len(batch) < max_batch:
                    try:
                        batch.append(q.get_nowait())
                    except queue.Empty:
                        break
                settlers = [self._lend(q, d) for d in batch]
                outcomes = run_batch_handler(handler, batch)
                retry = []
                for d, o, settler in zip(batch, outcomes, settlers, strict=True):
                    if o is Disposition.DEFERRED:
                        self._hold(q, d, settler)
                    elif settler.claim() and o is Disposition.RETRY:
                        retry.append(d)
                if retry:
                    self._stop.wait(RETRY_PAUSE_S)
                for delivery in retry:
                    delivery.redelivered = True
                    q.put(delivery)

        thread = threading.Thread(target=run, name=f"consume-{queue_name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def start(self) -> None:
        """Nothing to connect to: queues exist from construction."""

    def healthy(self) -> bool:
        return not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        with self._held_lock:
            held, self._held = list(self._held.values()), {}
        for q, delivery, settler in held:  # unacked at the close: back in the queue
            if settler.claim():
                delivery.redelivered = True
                q.put(delivery)

    close = stop
