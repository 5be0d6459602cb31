"""RabbitMQ adapter (pika).

pika connections belong to one thread. Two connections, each on its own thread:

* the **publisher** runs a ``SelectConnection`` I/O loop; other threads hand it batches with
  ``add_callback_threadsafe`` and wait for the batch's publisher confirms, so a batch of 500
  costs about one round trip instead of 500;
* the **consumer** runs a ``BlockingConnection`` that only receives and settles deliveries;
  the work (a database transaction) runs on a small thread pool, which hands the ack back to
  the I/O thread, so heartbeats are never starved.

Both reconnect on their own, with backoff, after the broker restarts.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from messaging.broker import EXCHANGES, QUEUES, Delivery, Disposition
from saga.messages import DEAD_LETTER_EXCHANGE, OutboundMessage

log = logging.getLogger(__name__)


def declare_topology(channel: BlockingChannel) -> None:
    """Durable, idempotent declarations of contract §4."""
    for name, kind in EXCHANGES:
        channel.exchange_declare(exchange=name, exchange_type=kind, durable=True)
    for name, arguments, binds in QUEUES:
        channel.queue_declare(queue=name, durable=True, arguments=arguments or None)
        for exchange, key in binds:
            channel.queue_bind(queue=name, exchange=exchange, routing_key=key)


def _properties(msg_id: str | None, correlation_id: str | None, type_: str | None,
                headers: dict[str, Any] | None = None) -> BasicProperties:
    return BasicProperties(content_type="application/json", delivery_mode=2,
                           message_id=msg_id, correlation_id=correlation_id, type=type_,
                           headers=headers)


@dataclass
class _Batch:
    size: int
    results: list[bool] = field(default_factory=list)
    pending: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.results = [False] * self.size
        self.pending = self.size
        if self.size == 0:
            self.done.set()

    def settle(self, index: int, ok: bool) -> None:
        self.results[index] = ok
        self.pending -= 1
        if self.pending <= 0:
            self.done.set()


@dataclass(frozen=True)
class _Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    properties: BasicProperties


class AsyncPublisher:
    """Publishes from any thread; confirms are awaited per batch, not per message."""

    def __init__(self, url: str, *, confirm_timeout: float = 15.0,
                 on_unroutable: Callable[[str, str], None] | None = None) -> None:
        self.params = pika.URLParameters(url)
        self.confirm_timeout = confirm_timeout
        self.on_unroutable = on_unroutable
        self._conn: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._inflight: dict[int, tuple[_Batch, int]] = {}
        self._unroutable_logged: dict[str, float] = {}
        self._tags = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="amqp-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        return self._send([_Outgoing(m.exchange, m.routing_key, m.encode(),
                                     _properties(m.message_id, m.correlation_id, m.type))
                           for m in messages])

    def publish_raw(self, exchange: str, routing_key: str, body: bytes,
                    properties: BasicProperties) -> bool:
        return self._send([_Outgoing(exchange, routing_key, body, properties)])[0]

    def _send(self, items: list[_Outgoing]) -> list[bool]:
        if not self._ready.wait(timeout=self.confirm_timeout):
            raise ConnectionError("not connected to RabbitMQ")
        conn = self._conn
        batch = _Batch(len(items))
        if conn is None:
            raise ConnectionError("not connected to RabbitMQ")
        try:
            conn.ioloop.add_callback_threadsafe(functools.partial(self._publish_batch, batch,
                                                                  items))
        except Exception as exc:  # the loop has gone away under us
            raise ConnectionError(str(exc)) from exc
        if not batch.done.wait(timeout=self.confirm_timeout):
            log.warning("publisher confirms timed out for %d of %d messages", batch.pending,
                        batch.size)
        return list(batch.results)

    # -- on the I/O thread ---------------------------------------------------------------------
    def _publish_batch(self, batch: _Batch, items: list[_Outgoing]) -> None:
        channel = self._channel
        for index, item in enumerate(items):
            if channel is None or not channel.is_open:
                batch.settle(index, False)
                continue
            tag = next(self._tags)
            self._inflight[tag] = (batch, index)
            try:
                channel.basic_publish(item.exchange, item.routing_key, item.body,
                                      item.properties, mandatory=True)
            except Exception:
                log.exception("basic_publish failed")
                self._inflight.pop(tag, None)
                batch.settle(index, False)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        tags = ([t for t in self._inflight if t <= method.delivery_tag] if method.multiple
                else [method.delivery_tag])
        for tag in tags:
            entry = self._inflight.pop(tag, None)
            if entry:
                entry[0].settle(entry[1], ok)

    def _on_return(self, _channel: Channel, method: Basic.Return, props: BasicProperties,
                   _body: bytes) -> None:
        # Unroutable: nobody bound a queue for it. It is still confirmed; we count it, and log
        # it at most once a minute per exchange so a missing consumer cannot flood the log.
        now = time.monotonic()
        key = method.exchange
        if now - self._unroutable_logged.get(key, -3600.0) >= 60:
            self._unroutable_logged[key] = now
            log.warning("unroutable messages to %s (e.g. %s, routing key %s): no queue is "
                        "bound for them; counted in aigen_unroutable_messages_total",
                        method.exchange, props.message_id, method.routing_key)
        if self.on_unroutable:
            self.on_unroutable(method.exchange, method.routing_key)

    def _fail_inflight(self) -> None:
        for batch, index in self._inflight.values():
            batch.settle(index, False)
        self._inflight.clear()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._conn = pika.SelectConnection(
                    self.params, on_open_callback=self._on_open,
                    on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed)
                self._conn.ioloop.start()
            except Exception:
                log.exception("publisher connection failed")
            self._ready.clear()
            self._channel = None
            self._fail_inflight()
            if self._stop.is_set():
                break
            backoff = 0.5 if time.monotonic() - started > 10 else min(backoff * 2, 10)
            log.warning("publisher disconnected; reconnecting in %.1fs", backoff)
            self._stop.wait(backoff)

    def _on_open_error(self, conn: pika.SelectConnection, error: BaseException) -> None:
        log.warning("publisher could not connect: %s", error)
        conn.ioloop.stop()  # _run backs off and tries again

    def _on_open(self, conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._tags = itertools.count(1)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_closed)
        self._channel = channel
        self._ready.set()
        log.info("publisher connected")

    def _on_channel_closed(self, channel: Channel, reason: Exception) -> None:
        log.warning("publisher channel closed: %s", reason)
        self._ready.clear()
        self._fail_inflight()
        if self._conn and self._conn.is_open:
            self._conn.close()

    def _on_closed(self, conn: pika.SelectConnection, reason: Exception) -> None:
        self._ready.clear()
        conn.ioloop.stop()

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            def close() -> None:
                if conn.is_open:
                    conn.close()
                else:
                    conn.ioloop.stop()
            with contextlib.suppress(Exception):  # the loop may already be gone
                conn.ioloop.add_callback_threadsafe(close)
        self._thread.join(timeout=5)


class QueueConsumer:
    """Consumes one queue; ``handler`` runs on a worker pool, acks go back to the I/O thread."""

    def __init__(self, url: str, queue_name: str, handler: Callable[[Delivery], Disposition],
                 *, prefetch: int, workers: int) -> None:
        self.params = pika.URLParameters(url)
        self.queue = queue_name
        self.handler = handler
        self.prefetch = prefetch
        # A plain queue feeding fixed worker threads: ThreadPoolExecutor.submit re-checks its
        # idle threads on every call, which costs the I/O thread more than the hand-off itself.
        self.work: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.workers = [threading.Thread(target=self._worker, name=f"work-{queue_name}-{n}",
                                         daemon=True) for n in range(workers)]
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"amqp-consume-{queue_name}",
                                        daemon=True)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._thread.start()

    def _worker(self) -> None:
        while (item := self.work.get()) is not None:
            self._work(*item)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            conn: pika.BlockingConnection | None = None
            try:
                conn = pika.BlockingConnection(self.params)
                channel = conn.channel()
                declare_topology(channel)
                channel.basic_qos(prefetch_count=self.prefetch)
                channel.basic_consume(self.queue, functools.partial(self._on_message, conn))
                self.connected.set()
                backoff = 0.5
                log.info("consuming %s", self.queue)
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.5)
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("consumer of %s disconnected (%s); reconnecting in %.1fs",
                                self.queue, exc, backoff)
            finally:
                self.connected.clear()
                if conn is not None and conn.is_open:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 10)

    def _on_message(self, conn: pika.BlockingConnection, channel: BlockingChannel,
                    method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        delivery = Delivery(body, method.routing_key, props.message_id,
                            dict(props.headers or {}), bool(method.redelivered))
        self.work.put((conn, channel, method.delivery_tag, delivery))

    def _work(self, conn: pika.BlockingConnection, channel: BlockingChannel, tag: int,
              delivery: Delivery) -> None:
        try:
            outcome = self.handler(delivery)
        except Exception:
            log.exception("handler failed; the message goes back to the broker")
            outcome = Disposition.RETRY
        if outcome is Disposition.RETRY:
            self._stop.wait(1.0)  # don't spin while the database is down

        def settle() -> None:
            if not channel.is_open:
                return  # the broker redelivers it on the next connection
            if outcome is Disposition.ACK:
                channel.basic_ack(tag)
            else:
                channel.basic_nack(tag, requeue=True)

        try:
            conn.add_callback_threadsafe(settle)
        except Exception:
            log.debug("connection gone before settling delivery %s", tag)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for _ in self.workers:
            self.work.put(None)
        for worker in self.workers:
            worker.join(timeout=5)


class RabbitBroker:
    def __init__(self, url: str, *, prefetch: int = 200, workers: int = 4,
                 on_unroutable: Callable[[str, str], None] | None = None) -> None:
        self.url = url
        self.prefetch = prefetch
        self.workers = workers
        self.publisher = AsyncPublisher(url, on_unroutable=on_unroutable)
        self.consumers: list[QueueConsumer] = []

    def start(self) -> None:
        try:
            self.declare()
        except Exception as exc:  # the consumer declares again on every (re)connect
            log.warning("RabbitMQ not reachable at start-up (%s); will keep trying", exc)
        self.publisher.start()

    def declare(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            declare_topology(conn.channel())
        finally:
            conn.close()

    def publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        return self.publisher.publish(messages)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = {**delivery.headers, "x-rejection-reason": reason[:1000],
                   "x-original-routing-key": delivery.routing_key}
        props = _properties(delivery.message_id, None, None, headers)
        if not self.publisher.publish_raw(DEAD_LETTER_EXCHANGE, delivery.routing_key,
                                          delivery.body, props):
            raise ConnectionError("dead-letter publish was not confirmed")

    def consume(self, queue: str, handler: Callable[[Delivery], Disposition]) -> None:
        consumer = QueueConsumer(self.url, queue, handler, prefetch=self.prefetch,
                                 workers=self.workers)
        consumer.start()
        self.consumers.append(consumer)

    def healthy(self) -> bool:
        return self.publisher.connected and all(c.connected.is_set() for c in self.consumers)

    def close(self) -> None:
        for consumer in self.consumers:
            consumer.stop()
        self.publisher.stop()
