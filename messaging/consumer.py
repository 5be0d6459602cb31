"""Turns deliveries from ``orchestrator.generation.results`` into saga commands.

The policy for everything a producer can get wrong sits here: bodies that are not JSON or
break the schema are dead-lettered with a reason; anything well-formed goes to the saga, which
applies it or records why not (duplicate, stale job, wrong state). A transient failure (the
database is down) hands the message back to the broker instead of losing it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from messaging.broker import Broker, Delivery, Disposition
from messaging.schemas import Result
from saga.commands import ApplyResult
from saga.errors import BillingUnavailable
from saga.handlers import UNKNOWN_GENERATION
from saga.inputs import find_nul
from saga.messagebus import MessageBus
from saga.messages import RESULTS_QUEUE
from saga.observer import Observer
from saga.tracing import NullTracer, Tracer

log = logging.getLogger(__name__)
MAX_RESULT_BYTES = 256 * 1024
_RESULT = TypeAdapter(Result)


class ResultConsumer:
    def __init__(self, bus: MessageBus, broker: Broker, observer: Observer,
                 tracer: Tracer | None = None) -> None:
        self.bus = bus
        self.broker = broker
        self.observer = observer
        self.tracer: Tracer = tracer or NullTracer()

    def handle(self, delivery: Delivery) -> Disposition:
        """Apply one delivery, in a CONSUMER span that continues the job's trace."""
        if not self.tracer.enabled():
            return self._handle(delivery)
        parent, generation_id = _trace_source(delivery)
        with self.tracer.span(
                f"{RESULTS_QUEUE} process", parent=parent, kind="consumer",
                attributes={"messaging.system": "rabbitmq",
                            "messaging.operation.type": "process",
                            "messaging.destination.name": RESULTS_QUEUE,
                            "messaging.rabbitmq.destination.routing_key": delivery.routing_key,
                            "messaging.message.id": delivery.message_id},
                generation_id=generation_id):
            log.debug("result %s for generation %s", delivery.routing_key, generation_id)
            return self._handle(delivery)

    def _handle(self, delivery: Delivery) -> Disposition:
        command_or_reason = parse_result(delivery.body)
        if isinstance(command_or_reason, str):
            self.observer.count("dead_lettered", reason=command_or_reason.split(":")[0])
            log.warning("dead-lettering result: %s", command_or_reason)
            self.tracer.span_event("message refused", reason=command_or_reason)
            self.broker.dead_letter(delivery, command_or_reason)
            return Disposition.ACK
        try:
            outcome = self.bus.handle(command_or_reason)
        except (OperationalError, InterfaceError, BillingUnavailable) as exc:
            log.warning("cannot apply the result now (%s); returning it to the broker", exc)
            return Disposition.RETRY
        except Exception as exc:  # a bug must not stall the queue: park the message instead
            log.exception("result could not be processed; dead-lettering it")
            self.tracer.span_event("message refused",
                                   reason=f"processing_error: {type(exc).__name__}")
            self.observer.count("dead_lettered", reason="processing_error")
            self.broker.dead_letter(delivery, f"processing_error: {type(exc).__name__}")
            return Disposition.ACK
        if outcome == UNKNOWN_GENERATION:
            log.warning("result for unknown generation %s (job %s)",
                        command_or_reason.generation_id, command_or_reason.job_id)
            self.observer.count("results", event_type=command_or_reason.event_type,
                                outcome=outcome)
        return Disposition.ACK


def _trace_source(delivery: Delivery) -> tuple[Any, str | None]:
    """(parent, generation id) of a delivery: the body's ``trace`` (n8n copies the job's),
    else the AMQP ``traceparent`` header. Parses the body a second time, only with tracing
    on; anything malformed just starts a new trace (``parse_result`` decides refusals)."""
    data: Any = None
    if len(delivery.body) <= MAX_RESULT_BYTES:
        try:
            data = json.loads(delivery.body)
        except (ValueError, UnicodeDecodeError):
            data = None
    if not isinstance(data, dict):
        return delivery.headers, None
    generation_id = data.get("generation_id")
    trace = data.get("trace")
    parent = trace if isinstance(trace, dict) and trace.get("traceparent") else delivery.headers
    return parent, generation_id if isinstance(generation_id, str) else None


def parse_result(body: bytes) -> ApplyResult | str:
    """The command for a result body, or the reason it must be dead-lettered."""
    if len(body) > MAX_RESULT_BYTES:
        return f"too_large: {len(body)} bytes (limit {MAX_RESULT_BYTES})"
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "not_json: the body is not UTF-8 JSON"
    nul = find_nul(data)
    if nul is not None:
        return f"schema: {nul or 'body'}: must not contain NUL characters"
    try:
        msg = _RESULT.validate_python(data)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False)[:5])
        return f"schema: {errors}"[:1000]
    common: dict[str, Any] = {"event_type": msg.event_type, "generation_id": msg.generation_id,
                              "job_id": msg.job_id, "event_id": msg.event_id}
    if msg.event_type == "AIGenerationSamplesReady":
        return ApplyResult(**common, samples=[s.model_dump() for s in msg.samples],
                           model=msg.model, duration_ms=msg.duration_ms)
    if msg.event_type == "AIGenerationFinalAssetReady":
        return ApplyResult(**common, asset=msg.asset.model_dump())
    if msg.event_type == "AIGenerationFailed":
        return ApplyResult(**common, error=msg.error.model_dump())
    return ApplyResult(**common, percent=msg.percent)
