"""The consumer: a ``BlockingConnection`` per queue that only receives and settles.

The work (a database transaction) runs on worker threads, which hand the acks back to the
I/O thread with ``add_callback_threadsafe``, so heartbeats are never starved. The I/O thread
hands over what one read of the socket brought (one queue put, not one per message); a
worker takes what is ready, up to ``max_batch``, without waiting for more, and settles the
whole batch with one callback once its handler returned (after the commit). What a
handler's outcome means is decided once, in :func:`messaging.broker.run_handler` /
:func:`~messaging.broker.run_batch_handler`. A delivery the handler answered ``DEFERRED``
for is left out of the batch's settling; the handler settles it later through its
``Delivery.settle`` (one more ``add_callback_threadsafe``), and until then it stays unacked —
holding a prefetch slot — and is redelivered by the broker if the connection goes first.

The I/O thread knows which of its channel's deliveries are still unsettled (all of them pass
through it, on arrival and when settled), so a batch's acks go out as one ``basic_ack`` with
``multiple=True`` when no delivery below the batch's highest tag is still open — another
worker's batch, a deferred retry, one not yet handed over; whatever such a delivery still
waits for, the batch's acks below it go out as one and the rest one by one. A multiple ack
never covers a delivery whose transaction has not committed.
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
    BatchHandler,
    Delivery,
    Disposition,
    Settler,
    run_batch_handler,
    run_handler,
)
from messaging.rabbitmq.connection import Reconnecting, declare_topology
from saga.retry import RetryPolicy

log = logging.getLogger(__name__)


# (connection, channel, delivery tag, delivery): a delivery and where to settle it.
Item = tuple[Any, Any, int, Delivery]


class QueueConsumer:
    """Consumes one queue; the handler runs on worker threads, acks go back to the I/O thread.

    ``handler`` takes one delivery; ``batch_handler`` (with ``max_batch``) takes the
    deliveries that are ready and answers one disposition for each.
    """

    def __init__(self, url: str, queue_name: str,
                 handler: Callable[[Delivery], Disposition] | None = None,
                 *, prefetch: int, workers: int, retry: RetryPolicy | None = None,
                 batch_handler: BatchHandler | None = None, max_batch: int = 1) -> None:
        if batch_handler is None:
            if handler is None:
                raise TypeError("a handler or a batch_handler is needed")
            one = handler
            batch_handler = lambda deliveries: [run_handler(one, d) for d in deliveries]  # noqa: E731
        self.params = pika.URLParameters(url)
        self.queue = queue_name
        self.handler = batch_handler
        self.max_batch = max(1, max_batch)
        self.prefetch = prefetch
        # A plain queue feeding fixed worker threads: ThreadPoolExecutor.submit re-checks its
        # idle threads on every call, which costs the I/O thread more than the hand-off itself.
        # Each item is what one read of the socket brought, in chunks of at most max_batch.
        self.work: queue.SimpleQueue[list[Item] | None] = queue.SimpleQueue()
        self._arrived: list[Item] = []  # the I/O thread's, until handed over
        self.workers = [threading.Thread(target=self._worker, name=f"work-{queue_name}-{n}",
                                         daemon=True) for n in range(workers)]
        self.connected = threading.Event()
        # The I/O thread's: the session's channel and its deliveries not yet settled.
        self._channel: Any = None
        self._unsettled: set[int] = set()
        self._loop = Reconnecting(f"amqp-consume-{queue_name}", self._session, retry)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._loop.start()

    def _worker(self) -> None:
        carry: list[Item] = []
        while True:
            if carry:
                batch, carry = carry, []
            else:
                item = self.work.get()
                if item is None:
                    return
                batch = item
            # Whatever else is ready joins the batch; nothing waits for more to arrive.
            while len(batch) < self.max_batch:
                try:
                    more = self.work.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.work.put(None)  # stop after this batch
                    break
                room = self.max_batch - len(batch)
                batch, carry = batch + more[:room], more[room:]
                if carry:
                    break
            self._work_batch(batch)

    def _session(self) -> None:
        conn: pika.BlockingConnection | None = None
        try:
            conn = pika.BlockingConnection(self.params)
            channel = conn.channel()
            declare_topology(channel)
            channel.basic_qos(prefetch_count=self.prefetch)
            self._track(channel)
            channel.basic_consume(self.queue, functools.partial(self._on_message, conn))
            self.connected.set()
            self._loop.connected()
            log.info("consuming %s", self.queue)
            while not self._loop.stopping.is_set():
                conn.process_data_events(time_limit=0.5)
                if self._arrived:
                    self._hand_over()
        finally:
            self._arrived = []  # unsettled: the broker redelivers them
            self._track(None)
            self.connected.clear()
            if conn is not None and conn.is_open:
                with contextlib.suppress(Exception):
                    conn.close()

    def _track(self, channel: Any) -> None:
        """On the I/O thread: from now on, count the deliveries of ``channel``."""
        self._channel = channel
        self._unsettled = set()

    def _on_message(self, conn: pika.BlockingConnection, channel: BlockingChannel,
                    method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        if channel is self._channel:
            self._unsettled.add(method.delivery_tag)
        headers = dict(props.headers or {})
        # A result we republished ourselves (see ResultConsumer) keeps its own routing key.
        key = headers.get(ORIGINAL_ROUTING_KEY)
        delivery = Delivery(body, key if isinstance(key, str) else method.routing_key,
                            props.message_id, headers, bool(method.redelivered),
                            queue=self.queue)
        self._arrived.append((conn, channel, method.delivery_tag, delivery))

    def _hand_over(self) -> None:
        arrived, self._arrived = self._arrived, []
        for n in range(0, len(arrived), self.max_batch):
            self.work.put(arrived[n:n + self.max_batch])

    def _work(self, conn: pika.BlockingConnection, channel: BlockingChannel, tag: int,
              delivery: Delivery) -> None:
        self._work_batch([(conn, channel, tag, delivery)])

    def _work_batch(self, batch: list[Item]) -> None:
        settlers = []
        for conn, channel, tag, delivery in batch:
            settler = Settler(functools.partial(self._settle_later, conn, channel, tag))
            delivery.settle = settler
            settlers.append(settler)
        outcomes = run_batch_handler(self.handler, [item[3] for item in batch])
        if Disposition.RETRY in outcomes:
            self._loop.stopping.wait(RETRY_PAUSE_S)  # don't spin while the database is down
        # One settle callback per connection (a batch may span a reconnect).
        by_conn: dict[int, tuple[Any, list[tuple[Any, int, Disposition]]]] = {}
        for (conn, channel, tag, _), outcome, settler in zip(batch, outcomes, settlers,
                                                             strict=True):
            if outcome is Disposition.DEFERRED or not settler.claim():
                continue  # the handler settles it later (or already did)
            by_conn.setdefault(id(conn), (conn, []))[1].append((channel, tag, outcome))
        for conn, settles in by_conn.values():
            try:
                conn.add_callback_threadsafe(functools.partial(self._settle, settles))
            except Exception:
                log.debug("connection gone before settling %d deliveries", len(settles))

    def _settle_later(self, conn: Any, channel: Any, tag: int, outcome: Disposition) -> None:
        """From any thread: settle one deferred delivery on its connection's I/O thread."""
        try:
            conn.add_callback_threadsafe(functools.partial(self._settle,
                                                           [(channel, tag, outcome)]))
        except Exception:
            log.debug("connection gone before settling deferred delivery %d; the broker "
                      "redelivers it", tag)

    def _settle(self, settles: list[tuple[Any, int, Disposition]]) -> None:
        """On the I/O thread: ack what is done, hand back what must be retried."""
        acks: dict[int, tuple[Any, list[int]]] = {}
        for channel, tag, outcome in settles:
            if not channel.is_open:
                continue  # the broker redelivers it on the next connection
            if outcome is Disposition.ACK:
                acks.setdefault(id(channel), (channel, []))[1].append(tag)
            elif outcome is Disposition.RETRY:
                if channel is self._channel:
                    self._unsettled.discard(tag)
                channel.basic_nack(tag, requeue=True)
        for channel, tags in acks.values():
            self._ack(channel, tags)

    def _ack(self, channel: Any, tags: list[int]) -> None:
        """Ack ``tags`` (each settled once, by its :class:`Settler`): one ``multiple`` ack for
        those below the lowest delivery of the channel still open, the others one by one.
        A channel this consumer does not track (a delivery handed in by hand) gets one ack
        per tag."""
        if channel is not self._channel:
            for tag in tags:
                channel.basic_ack(tag)
            return
        unsettled = self._unsettled
        unsettled.difference_update(tags)
        floor = min(unsettled, default=None)
        below = [tag for tag in tags if floor is None or tag < floor]
        if len(below) > 1:
            # Every delivery of this channel up to max(below) is settled now or before:
            # the ones still open are all above it.
            channel.basic_ack(max(below), multiple=True)
        elif below:
            channel.basic_ack(below[0])
        for tag in tags:
            if floor is not None and tag > floor:
                channel.basic_ack(tag)

    def stop(self) -> None:
        self._loop.stop()
        self._loop.join()
        for _ in self.workers:
            self.work.put(None)
        for worker in self.workers:
            worker.join(timeout=5)

