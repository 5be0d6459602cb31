"""The one reconnect loop both RabbitMQ connections (publisher and consumer) run.

pika connections belong to one thread; each of ours runs :class:`Reconnecting` on its own
thread. A *session* opens a connection and serves it until it drops; the loop then waits
with one exponential backoff (0.5 s doubling to 10 s, back to 0.5 s once a session got
connected) and opens the next, until :meth:`Reconnecting.stop`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel

from messaging.broker import EXCHANGES, QUEUES

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0


def declare_topology(channel: BlockingChannel) -> None:
    """Durable, idempotent declarations of the contract's exchanges and queues."""
    for name, kind in EXCHANGES:
        channel.exchange_declare(exchange=name, exchange_type=kind, durable=True)
    for name, arguments, binds in QUEUES:
        channel.queue_declare(queue=name, durable=True, arguments=arguments or None)
        for exchange, key in binds:
            channel.queue_bind(queue=name, exchange=exchange, routing_key=key)


def declare(url: str) -> None:
    """Declare the topology once over a short-lived connection."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        declare_topology(conn.channel())
    finally:
        conn.close()


class Reconnecting:
    """Runs ``session`` on a thread of its own, again and again, with one backoff.

    ``session`` blocks while its connection is up and returns (or raises) when it drops;
    it calls :meth:`connected` once the connection is usable, which resets the backoff.
    """

    def __init__(self, name: str, session: Callable[[], None]) -> None:
        self.name = name
        self.session = session
        self.stopping = threading.Event()
        self._backoff = BACKOFF_START_S
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def connected(self) -> None:
        self._backoff = BACKOFF_START_S

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.session()
            except Exception as exc:
                if not self.stopping.is_set():
                    log.warning("%s: connection failed (%s)", self.name, exc)
            if self.stopping.is_set():
                break
            log.warning("%s disconnected; reconnecting in %.1fs", self.name, self._backoff)
            self.stopping.wait(self._backoff)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end; the caller closes the live connection so the session returns."""
        self.stopping.set()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout=timeout)
