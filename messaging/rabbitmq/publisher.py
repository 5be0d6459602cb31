"""The publisher: one ``SelectConnection`` on its own I/O thread, confirms per batch.

Other threads hand it batches with ``add_callback_threadsafe`` and wait for the batch's
publisher confirms, so a batch of 500 costs about one round trip instead of 500. It
reconnects through :class:`messaging.rabbitmq.connection.Reconnecting`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from messaging.broker import unroutable_headers
from messaging.rabbitmq.connection import Reconnecting
from saga.messages import UNROUTABLE_QUEUE, OutboundMessage
from saga.retry import RetryPolicy

log = logging.getLogger(__name__)


def properties(msg_id: str | None, correlation_id: str | None, type_: str | None,
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


def outgoing(m: OutboundMessage) -> _Outgoing:
    """What the I/O thread publishes for ``m``."""
    return _Outgoing(m.exchange, m.routing_key, m.encode(),
                     properties(m.message_id, m.correlation_id, m.type,
                                {"traceparent": m.traceparent} if m.traceparent else None))


class AsyncPublisher:
    """Publishes from any thread; confirms are awaited per batch, not per message."""

    def __init__(self, url: str, *, confirm_timeout: float = 15.0,
                 on_unroutable: Callable[[str, str], None] | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self.params = pika.URLParameters(url)
        self.confirm_timeout = confirm_timeout
        self.on_unroutable = on_unroutable
        self._conn: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._ready = threading.Event()
        self._inflight: dict[int, tuple[_Batch, int]] = {}
        self._unroutable_logged: dict[str, float] = {}
        self._tags = itertools.count(1)
        self._loop = Reconnecting("amqp-publisher", self._session, retry)

    def start(self) -> None:
        self._loop.start()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        return self._send([outgoing(m) for m in messages])

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
        self._coalesce_output()

    def _coalesce_output(self) -> None:
        """Let the batch leave in one socket write instead of three per message.

        pika queues every frame (method, header, body) as a buffer of its own and sends each
        with a ``send`` call of its own once the socket is writable: 48 system calls for a
        batch of 16, and as many TCP segments for the broker to read. Joined into one buffer
        (same bytes, same order; on the I/O thread, between two of pika's sends), the batch
        costs one. pika keeps the queue on its transport; without it (another pika, a test's
        stand-in) the frames simply go out as pika queued them.
        """
        buffers = getattr(getattr(self._conn, "_transport", None), "_tx_buffers", None)
        if isinstance(buffers, collections.deque) and len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        tags = ([t for t in self._inflight if t <= method.delivery_tag] if method.multiple
                else [method.delivery_tag])
        for tag in tags:
            entry = self._inflight.pop(tag, None)
            if entry:
                entry[0].settle(entry[1], ok)

    def _on_return(self, channel: Channel, method: Basic.Return, props: BasicProperties,
                   body: bytes) -> None:
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
        self._park(channel, method, props, body)

    def _park(self, channel: Channel, method: Basic.Return, props: BasicProperties,
              body: bytes) -> None:
        """Keep a returned message in the holding queue (drained into the dead-letter store).

        Sent by queue name through the default exchange, not mandatory (no loop if the queue
        is gone). Its confirm uses a delivery tag, so it takes one from the counter.
        """
        if method.exchange == "" or not channel.is_open:
            return
        headers = {**(props.headers or {}),
                   **unroutable_headers(method.exchange, method.routing_key)}
        parked = BasicProperties(content_type=props.content_type, delivery_mode=2,
                                 message_id=props.message_id,
                                 correlation_id=props.correlation_id, type=props.type,
                                 headers=headers)
        next(self._tags)
        try:
            channel.basic_publish("", UNROUTABLE_QUEUE, body, parked)
        except Exception:
            log.exception("could not park an unroutable message")

    def _fail_inflight(self) -> None:
        for batch, index in self._inflight.values():
            batch.settle(index, False)
        self._inflight.clear()

    def _session(self) -> None:
        try:
            self._conn = pika.SelectConnection(
                self.params, on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed)
            self._conn.ioloop.start()
        finally:
            self._ready.clear()
            self._channel = None
            self._fail_inflight()

    def _on_open_error(self, conn: pika.SelectConnection, error: BaseException) -> None:
        log.warning("publisher could not connect: %s", error)
        conn.ioloop.stop()  # the session ends; the loop backs off and tries again

    def _on_open(self, conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._tags = itertools.count(1)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_closed)
        self._channel = channel
        self._ready.set()
        self._loop.connected()
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
        self._loop.stop()
        conn = self._conn
        if conn is not None:
            def close() -> None:
                if conn.is_open:
                    conn.close()
                else:
                    conn.ioloop.stop()
            with contextlib.suppress(Exception):  # the loop may already be gone
                conn.ioloop.add_callback_threadsafe(close)
        self._loop.join()
