"""The one reconnect loop both RabbitMQ connections (publisher and consumer) run.

pika connections belong to one thread; each of ours runs :class:`Reconnecting` on its own
thread. A *session* opens a connection and serves it until it drops; the loop then waits
by the service's one retry policy (:mod:`saga.retry`; by default 0.5 s doubling to 10 s with
jitter, back to the start once a session got connected) and opens the next, until
:meth:`Reconnecting.stop`. Reconnecting never gives up: the budget does not apply here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from messaging.broker import EXCHANGES, QUEUES
from saga.failures import FAILURE_LOG
from saga.retry import RetryPolicy, register_transient

log = logging.getLogger(__name__)

# The broker unreachable: transient, retried (saga/retry.py).
register_transient(pika.exceptions.AMQPConnectionError)

RECONNECT = RetryPolicy(base=0.5, cap=10.0)


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

    def __init__(self, name: str, session: Callable[[], None],
                 retry: RetryPolicy | None = None) -> None:
        self.name = name
        self.session = session
        self.stopping = threading.Event()
        self.retry = retry or RECONNECT
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def connected(self) -> None:
        if self._failures:
            FAILURE_LOG.recovered(f"{self.name} connection")
        self._failures = 0

    def _run(self) -> None:
        while not self.stopping.is_set():
            error = "disconnected"
            try:
                self.session()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if self.stopping.is_set():
                break
            self._failures += 1
            FAILURE_LOG.failed(f"{self.name} connection", error)
            self.stopping.wait(self.retry.delay(self._failures))

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end; the caller closes the live connection so the session returns."""
        self.stopping.set()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout=timeout)
