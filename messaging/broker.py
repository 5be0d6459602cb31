"""The broker interface both adapters implement, the contract topology, the consumer policy.

:func:`run_handler` is the one place that decides what a handler's outcome means for a
delivery (a handler that raises is a transient failure: the message goes back); both the
RabbitMQ and the in-process adapter call it, and pause :data:`RETRY_PAUSE_S` after a retry.
Both give every delivery a :class:`Settler` while a handler has it, so a handler may answer
``Disposition.DEFERRED`` and settle it itself later (a result waiting for its retry).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from saga.messages import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    GENERATION_EXCHANGE,
    JOBS_QUEUE,
    NOTIFICATION_EXCHANGE,
    RESULTS_QUEUE,
    UNROUTABLE_QUEUE,
    OutboundMessage,
)

log = logging.getLogger(__name__)

# After a delivery goes back (database down), its consumer waits this long before the next.
RETRY_PAUSE_S = 1.0
# How often a result has been republished after a transient failure (see ResultConsumer).
ATTEMPTS_HEADER = "x-aigen-attempts"
ORIGINAL_ROUTING_KEY = "x-original-routing-key"

# (exchange, type) declared at start-up; all durable.
EXCHANGES = [
    (GENERATION_EXCHANGE, "topic"),
    (NOTIFICATION_EXCHANGE, "topic"),
    (EVENTS_EXCHANGE, "topic"),
    (DEAD_LETTER_EXCHANGE, "fanout"),
]
# (queue, arguments, [(exchange, binding key)])
QUEUES: list[tuple[str, dict[str, Any], list[tuple[str, str]]]] = [
    (JOBS_QUEUE, {}, [(GENERATION_EXCHANGE, "generation.job.*")]),
    (RESULTS_QUEUE, {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
     [(GENERATION_EXCHANGE, "generation.result.#")]),
    (DEAD_LETTER_QUEUE, {}, [(DEAD_LETTER_EXCHANGE, "")]),
    # No binding: the publisher sends returned (unroutable) messages here by queue name.
    (UNROUTABLE_QUEUE, {}, []),
]

# Headers on a parked message: where it was going and why it is parked.
ORIGINAL_EXCHANGE = "x-original-exchange"
ORIGINAL_ROUTING_KEY = "x-original-routing-key"
REJECTION_REASON = "x-rejection-reason"


def unroutable_headers(exchange: str, routing_key: str) -> dict[str, Any]:
    return {ORIGINAL_EXCHANGE: exchange, ORIGINAL_ROUTING_KEY: routing_key,
            REJECTION_REASON: "unroutable: no queue is bound for this routing key"}


@dataclass
class Delivery:
    body: bytes
    routing_key: str
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    queue: str | None = None  # the queue it was consumed from
    # Set by the consuming adapter while a handler has the delivery: settles it later, from
    # any thread (see Disposition.DEFERRED). None for a delivery handed in by hand.
    settle: Callable[[Disposition], None] | None = field(
        default=None, repr=False, compare=False)


class Disposition(Enum):
    ACK = "ack"  # done (applied, refused and recorded, or dead-lettered)
    RETRY = "retry"  # transient failure (database down): give it back to the broker
    # The handler keeps the delivery unsettled and calls ``delivery.settle`` with ACK or
    # RETRY itself later (a result waiting for its retry's backoff); until then it stays
    # unacked, and if that never happens (stop, lost connection) the broker redelivers it.
    DEFERRED = "deferred"


class Settler:
    """A delivery's settle hook (``Delivery.settle``): the adapter's ``action`` runs for the
    first settle only — the worker's, or the handler's own later one after DEFERRED — so a
    delivery is never acked twice (which would close the channel)."""

    __slots__ = ("_action", "_token")

    def __init__(self, action: Callable[[Disposition], None]) -> None:
        self._action = action
        self._token = [True]

    def claim(self) -> bool:
        """True the first time only (``list.pop`` is atomic: safe across threads)."""
        try:
            self._token.pop()
        except IndexError:
            return False
        return True

    def settled(self) -> bool:
        return not self._token

    def __call__(self, outcome: Disposition) -> None:
        if self.claim():
            self._action(outcome)


# Takes the deliveries that are ready, returns one disposition per delivery, in order.
BatchHandler = Callable[[Sequence[Delivery]], list[Disposition]]


class Broker(Protocol):
    def start(self) -> None:
        """Connect (or keep trying in the background); never raises for a missing server."""

    def publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        """Publish and wait for the broker's confirms; one flag per message."""

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send ``delivery`` to the dead-letter exchange with ``x-rejection-reason``."""

    def consume(self, queue: str, handler: Callable[[Delivery], Disposition]) -> None:
        """Start consuming ``queue`` in the background."""

    def consume_batches(self, queue: str, handler: BatchHandler, *, max_batch: int) -> None:
        """Start consuming ``queue``; ``handler`` gets the deliveries that are ready (up to
        ``max_batch``, never waiting for more) and returns one disposition for each."""

    def redeliver(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        """Publish ``delivery`` again to the back of its queue with ``headers`` added; return
        once the broker confirmed it (raise otherwise). The caller then acks the original."""

    def healthy(self) -> bool: ...

    def stop(self) -> None:
        """Stop consuming and close the connections."""

    def close(self) -> None:
        """Same as :meth:`stop` (kept for existing callers)."""


def run_batch_handler(handler: BatchHandler, deliveries: Sequence[Delivery]
                      ) -> list[Disposition]:
    """:func:`run_handler` for a batch: a handler that raises (or answers for the wrong
    number of deliveries) hands every delivery of the batch back (RETRY)."""
    try:
        outcomes = handler(deliveries)
    except Exception:
        log.exception("batch handler failed; its %d messages go back to the broker",
                      len(deliveries))
        return [Disposition.RETRY] * len(deliveries)
    if len(outcomes) != len(deliveries):
        log.error("batch handler answered %d of %d messages; they go back to the broker",
                  len(outcomes), len(deliveries))
        return [Disposition.RETRY] * len(deliveries)
    return outcomes


def run_handler(handler: Callable[[Delivery], Disposition], delivery: Delivery) -> Disposition:
    """The handler's disposition; a handler that raises hands the message back (RETRY)."""
    try:
        return handler(delivery)
    except Exception:
        log.exception("handler failed; the message goes back to the broker")
        return Disposition.RETRY


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""
    regex = "^" + re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\#", r".*") + "$"
    regex = regex.replace(r"\..*", r"(\..*)?").replace(r".*\.", r"(.*\.)?")
    return re.match(regex, routing_key) is not None
