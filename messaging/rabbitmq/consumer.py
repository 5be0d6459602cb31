"""The consumer: a ``BlockingConnection`` per queue that only receives and settles.

The work (a database transaction) runs on a small pool of worker threads, which hand the
ack back to the I/O thread with ``add_callback_threadsafe``, so heartbeats are never
starved. What a handler's outcome means is decided once, in :func:`messaging.broker.run_handler`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from messaging.broker import (
    ORIGINAL_ROUTING_KEY,
    RETRY_PAUSE_S,
    Delivery,
    Disposition,
    run_handler,
)
from messaging.rabbitmq.connection import Reconnecting, declare_topology
from saga.retry import RetryPolicy

log = logging.getLogger(__name__)


class QueueConsumer:
    """Consumes one queue; ``handler`` runs on a worker pool, acks go back to the I/O thread."""

    def __init__(self, url: str, queue_name: str, handler: Callable[[Delivery], Disposition],
                 *, prefetch: int, workers: int, retry: RetryPolicy | None = None) -> None:
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
        self._loop = Reconnecting(f"amqp-consume-{queue_name}", self._session, retry)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._loop.start()

    def _worker(self) -> None:
        while (item := self.work.get()) is not None:
            self._work(*item)

    def _session(self) -> None:
        conn: pika.BlockingConnection | None = None
        try:
            conn = pika.BlockingConnection(self.params)
            channel = conn.channel()
            declare_topology(channel)
            channel.basic_qos(prefetch_count=self.prefetch)
            channel.basic_consume(self.queue, functools.partial(self._on_message, conn))
            self.connected.set()
            self._loop.connected()
            log.info("consuming %s", self.queue)
            while not self._loop.stopping.is_set():
                conn.process_data_events(time_limit=0.5)
        finally:
            self.connected.clear()
            if conn is not None and conn.is_open:
                with contextlib.suppress(Exception):
                    conn.close()

    def _on_message(self, conn: pika.BlockingConnection, channel: BlockingChannel,
                    method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        headers = dict(props.headers or {})
        # A result we republished ourselves (see ResultConsumer) keeps its own routing key.
        key = headers.get(ORIGINAL_ROUTING_KEY)
        delivery = Delivery(body, key if isinstance(key, str) else method.routing_key,
                            props.message_id, headers, bool(method.redelivered),
                            queue=self.queue)
        self.work.put((conn, channel, method.delivery_tag, delivery))

    def _work(self, conn: pika.BlockingConnection, channel: BlockingChannel, tag: int,
              delivery: Delivery) -> None:
        outcome = run_handler(self.handler, delivery)
        if outcome is Disposition.RETRY:
            self._loop.stopping.wait(RETRY_PAUSE_S)  # don't spin while the database is down

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
        self._loop.stop()
        self._loop.join()
        for _ in self.workers:
            self.work.put(None)
        for worker in self.workers:
            worker.join(timeout=5)
