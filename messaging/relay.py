"""The outbox relay: moves committed outbox rows to the broker, at least once.

Rows are claimed in batches with ``SELECT … FOR UPDATE SKIP LOCKED`` (so several processes
relay side by side), published with publisher confirms, and marked sent only once confirmed.
While the broker is down the rows simply stay, and the relay backs off.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Protocol

from messaging.broker import Broker
from saga.failures import FAILURE_LOG
from saga.messages import OutboundMessage
from saga.observer import Observer
from saga.retry import RetryPolicy
from saga.tracing import NullTracer, Tracer

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[OutboundMessage]], list[bool]]


class OutboxStore(Protocol):
    def relay_batch(self, limit: int, publish: Publish) -> int:
        """Claim up to ``limit`` unsent rows, ``publish`` them, mark the confirmed ones sent.

        Returns how many were claimed.
        """


class OutboxRelay:
    def __init__(self, store: OutboxStore, broker: Broker, observer: Observer, *,
                 batch_size: int = 500, idle_interval: float = 0.05,
                 max_idle_interval: float = 2.0, coalesce: float = 0.005,
                 max_backoff: float = 5.0, retry: RetryPolicy | None = None,
                 tracer: Tracer | None = None) -> None:
        self.store = store
        self.tracer: Tracer = tracer or NullTracer()
        self.broker = broker
        self.observer = observer
        self.batch_size = batch_size
        self.idle_interval = idle_interval
        # Polls while nothing arrives back off from idle_interval to max_idle_interval: this
        # process's commits wake the relay at once, so the slow poll only bounds how late rows
        # of another process (one that died before relaying them) are picked up.
        self.max_idle_interval = max(idle_interval, max_idle_interval)
        self.coalesce = coalesce
        # Publish retries: the rows stay in the outbox, so the budget never runs out here;
        # only the delay between tries follows the policy, capped at ``max_backoff``.
        self.retry = (retry or RetryPolicy(base=0.2)).limited(cap=max_backoff)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Called after a commit that added outbox rows: relay now rather than at the next poll."""
        self._wake.set()

    def run_once(self) -> int:
        return self.store.relay_batch(self.batch_size, self._publish)

    def _publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        if any(m.traceparent for m in messages):  # rows written with tracing on
            with ExitStack() as spans:
                return self._count(self.broker.publish(self._traced(messages, spans)))
        return self._count(self.broker.publish(messages))

    def _traced(self, messages: Sequence[OutboundMessage], spans: ExitStack
                ) -> list[OutboundMessage]:
        """One PRODUCER span per message, continuing the trace of the transaction that wrote
        the row (this thread has no context of its own); the message carries the span's
        traceparent. The spans end once the broker has confirmed the batch."""
        traced = []
        for m in messages:
            if m.traceparent:
                spans.enter_context(self.tracer.span(
                    f"{m.exchange} publish", parent=m.traceparent, kind="producer",
                    attributes={"messaging.system": "rabbitmq",
                                "messaging.operation.type": "publish",
                                "messaging.destination.name": m.exchange,
                                "messaging.rabbitmq.destination.routing_key": m.routing_key,
                                "messaging.message.id": m.message_id},
                    generation_id=m.correlation_id))
                log.debug("publishing %s %s for generation %s", m.type, m.message_id,
                          m.correlation_id)
                m = dataclasses.replace(
                    m, traceparent=self.tracer.current_traceparent() or m.traceparent)
            traced.append(m)
        return traced

    def _count(self, confirmed: list[bool]) -> list[bool]:
        sent = sum(confirmed)
        self.observer.count("outbox_published", outcome="confirmed") if sent else None
        return confirmed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        idle = self.idle_interval
        while not self._stop.is_set():
            try:
                claimed = self.run_once()
            except Exception as exc:  # broker or database down: keep the rows, back off
                failures += 1
                FAILURE_LOG.failed("outbox relay", f"{type(exc).__name__}: {exc}")
                self._stop.wait(self.retry.delay(failures))
                continue
            if failures:
                failures = 0
                FAILURE_LOG.recovered("outbox relay")
            idle = self.idle_interval if claimed else min(idle * 2, self.max_idle_interval)
            if claimed < self.batch_size:
                if self._wake.wait(idle):
                    # Let the commits landing right now join this batch: under load a batch
                    # of many rows costs little more than a batch of one.
                    self._stop.wait(self.coalesce)
                    idle = self.idle_interval
                self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)
