"""Drains the dead-letter queue and the unroutable holding queue into the service's store.

``orchestrator.generation.results.dlq`` receives results the consumer could not use (it
publishes them to ``creativeflow.dlx`` with ``x-rejection-reason``; RabbitMQ's own
dead-lettering adds ``x-death``). ``orchestrator.unroutable`` receives outbound messages no
queue was bound for (the publisher parks them there). Each delivery becomes one
``dead_letters`` row — inserted, then acknowledged; a redelivery after a crash between the two
is the same message key and stored once — so support can list, replay and discard it by id.
The key is the message id (the consumer gives a dead-lettered message without one an id of
its own); only a message RabbitMQ dead-lettered itself may lack one, and then identical
copies (same exchange, routing key, reason and body) are stored once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from messaging.broker import (
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REJECTION_REASON,
    Broker,
    Delivery,
    Disposition,
)
from saga.commands import StoreDeadLetter
from saga.effects import utcnow
from saga.input_policy import loads_bounded
from saga.messagebus import MessageBus
from saga.messages import DEAD_LETTER_QUEUE, GENERATION_EXCHANGE, UNROUTABLE_QUEUE

MAX_STORED_BODY = 1024 * 1024  # a larger body is cut (and so can no longer be replayed)


_GENERATION_ID = re.compile(r"^[A-Za-z0-9-]{1,36}$")


def _text(value: Any) -> str | None:
    """A header value as text PostgreSQL can store (no NUL), or None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else None


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _generation_id(body: bytes) -> str | None:
    try:  # bounded: a dead letter is often exactly the body that nests too deep to parse
        data = loads_bounded(body)
    except (ValueError, UnicodeDecodeError):
        return None
    value = data.get("generation_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and _GENERATION_ID.match(value) else None


def to_command(delivery: Delivery, queue: str, now: datetime) -> StoreDeadLetter:
    """What to store for one delivery from ``queue``."""
    headers = delivery.headers or {}
    death = _first_death(headers)
    keys = death.get("routing-keys")
    death_key = _text(keys[0]) if isinstance(keys, list) and keys else None
    routing_key = (_text(headers.get(ORIGINAL_ROUTING_KEY)) or death_key
                   or _text(delivery.routing_key) or "")
    exchange = (_text(headers.get(ORIGINAL_EXCHANGE)) or _text(death.get("exchange"))
                or GENERATION_EXCHANGE)
    reason = (_text(headers.get(REJECTION_REASON))
              or (f"rejected by RabbitMQ: {_text(death.get('reason'))}" if death else None)
              or "unknown")
    body = delivery.body
    if len(body) > MAX_STORED_BODY:
        body = body[:MAX_STORED_BODY]
        reason = f"{reason} (body cut to {MAX_STORED_BODY} bytes)"
    kind = "unroutable" if queue == UNROUTABLE_QUEUE else "dlq"
    if delivery.message_id:
        key = f"{kind}:{_text(delivery.message_id)}"
    else:
        digest = hashlib.sha256(b"\0".join([exchange.encode(), routing_key.encode(),
                                             reason.encode(), delivery.body])).hexdigest()
        key = f"{kind}:sha256:{digest}"
    return StoreDeadLetter(message_key=key[:255], dead_lettered_at=now, reason=reason[:1000],
                           exchange=exchange[:128], routing_key=routing_key[:255], body=body,
                           generation_id=_generation_id(body))


class DeadLetterDrain:
    """Consumes both queues through the broker (RabbitMQ or the in-process one)."""

    QUEUES = (DEAD_LETTER_QUEUE, UNROUTABLE_QUEUE)

    def __init__(self, bus: MessageBus, broker: Broker,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.bus = bus
        self.broker = broker
        self.clock = clock

    def handler(self, queue: str) -> Callable[[Delivery], Disposition]:
        def handle(delivery: Delivery) -> Disposition:
            # Raising (database down) hands the message back to the broker: nothing is lost.
            self.bus.handle(to_command(delivery, queue, self.clock()))
            return Disposition.ACK
        return handle

    def start(self) -> None:
        for queue in self.QUEUES:
            self.broker.consume(queue, self.handler(queue))

    def stop(self) -> None:
        """The consumers stop with the broker."""
