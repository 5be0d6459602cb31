"""Turns deliveries from ``orchestrator.generation.results`` into saga commands.

The policy for everything a producer can get wrong sits here: bodies that are not JSON, are
nested deeper than 32 levels or break the schema are dead-lettered once with a reason;
anything well-formed goes to the saga, which applies it or records why not (duplicate, stale
job, wrong state).

A failure while applying is classified (:func:`saga.retry.classify`). A *transient* one (the
database or billing unreachable) is retried within the one retry policy's budget: after the
backoff the message is republished to the back of its queue with ``x-aigen-attempts`` + 1 —
confirmed by the broker *before* the original is acked, so nothing is lost (a crash in between
at worst repeats it, and the inbox drops the repeat). The count travels with the message, so
it survives restarts and redelivery to other consumers. A *permanent* failure (billing
refused, a saga row that does not load, a bug) or an exhausted budget dead-letters the message
once with ``x-rejection-reason`` and parks its saga (``attention`` kind ``result``).

The backoff never occupies a worker: the handler answers ``Disposition.DEFERRED`` and the
delivery stays unacked while a timer (:class:`messaging.deferred.Later`, one thread) waits;
the timer's job republishes it and only then settles it through ``delivery.settle`` — ACK
once the copy is confirmed, RETRY (handed back unchanged) if the broker refused the copy. The
worker goes straight on, so one result billing answers 503 for does not hold up the others.
At most ``max_deferred`` (half the prefetch) wait at once; see :mod:`messaging.deferred`.
:meth:`ResultConsumer.stop` leaves the ones still waiting unacked: the broker redelivers them.
A delivery handed in by hand (no ``settle``: tests, tools) waits in the call, as before.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from messaging.broker import ATTEMPTS_HEADER, Broker, Delivery, Disposition, run_handler
from messaging.deferred import Later
from messaging.schemas import Result
from saga.commands import ApplyResult, ApplyResults, Park
from saga.failures import FAILURE_LOG
from saga.handlers import UNKNOWN_GENERATION
from saga.input_policy import JsonInvalid, JsonTooDeep, loads_bounded
from saga.inputs import find_nul
from saga.messagebus import MessageBus
from saga.messages import RESULTS_QUEUE
from saga.observer import Observer
from saga.retry import RetryPolicy, classify
from saga.tracing import NullTracer, Tracer

log = logging.getLogger(__name__)
MAX_RESULT_BYTES = 256 * 1024
MAX_RESULT_DEPTH = 32
# Results waiting for their retry at once, each holding a prefetch slot (bootstrap: half the
# prefetch). Beyond it a new transient failure waits for the earliest retry to go out.
MAX_DEFERRED = 100
_RESULT = TypeAdapter(Result)


def attempts_of(delivery: Delivery) -> int:
    """How often this result was republished after a transient failure (0: never)."""
    raw = delivery.headers.get(ATTEMPTS_HEADER, 0)
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    try:
        return max(0, int(raw))
    except (TypeError, ValueError):
        return 0


class ResultConsumer:
    def __init__(self, bus: MessageBus, broker: Broker, observer: Observer,
                 retry: RetryPolicy | None = None, tracer: Tracer | None = None,
                 *, max_deferred: int = MAX_DEFERRED) -> None:
        self.bus = bus
        self.broker = broker
        self.observer = observer
        self.tracer: Tracer = tracer or NullTracer()
        self.retry = retry or bus.ctx.retry
        self.later = Later("result-retries", limit=max_deferred)

    def waiting(self) -> int:
        """Results waiting for their retry (unacked), for the gauge."""
        return self.later.pending()

    def stop(self) -> None:
        """Drop the retries still waiting: their deliveries stay unacked and the broker
        redelivers them (call before the broker stops, so none is republished after)."""
        self.later.stop()

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

    def handle_batch(self, deliveries: Sequence[Delivery]) -> list[Disposition]:
        """Apply the deliveries that are ready together: one transaction, one commit.

        Malformed ones are dead-lettered on their own first. If the batch's transaction
        raises, nothing of it stays and each result is applied again on its own, exactly as
        :meth:`handle` does (its own retry, dead letter and parking): one bad result never
        takes the others down. The caller acks only after this returns, so after the commit.
        With tracing on, each result keeps its own span and transaction (:meth:`handle`).
        """
        if len(deliveries) == 1 or self.tracer.enabled():
            return [run_handler(self.handle, d) for d in deliveries]
        outcomes: list[Disposition] = [Disposition.ACK] * len(deliveries)
        batch: list[tuple[int, Delivery, ApplyResult]] = []
        for i, delivery in enumerate(deliveries):
            command_or_reason = parse_result(delivery.body)
            if isinstance(command_or_reason, str):
                outcomes[i] = run_handler(
                    functools.partial(self._refuse, reason=command_or_reason), delivery)
            else:
                batch.append((i, delivery, command_or_reason))
        if len(batch) == 1:
            i, delivery, cmd = batch[0]
            outcomes[i] = run_handler(functools.partial(self._apply, cmd=cmd), delivery)
        elif batch:
            try:
                applied = self.bus.handle(ApplyResults(tuple(cmd for _, _, cmd in batch)))
            except Exception as exc:
                log.debug("a batch of %d results failed (%s: %s); applying them one by one",
                         len(batch), type(exc).__name__, str(exc)[:200])
                self.observer.count("result_batches", outcome="split")
                for i, delivery, cmd in batch:
                    outcomes[i] = run_handler(functools.partial(self._apply, cmd=cmd), delivery)
            else:
                FAILURE_LOG.recovered("applying a result")
                self.observer.count("result_batches", outcome="committed")
                for (_, _, cmd), outcome in zip(batch, applied, strict=True):
                    self._applied(cmd, outcome)
        return outcomes

    def _handle(self, delivery: Delivery) -> Disposition:
        command_or_reason = parse_result(delivery.body)
        if isinstance(command_or_reason, str):
            return self._refuse(delivery, command_or_reason)
        return self._apply(delivery, command_or_reason)

    def _refuse(self, delivery: Delivery, reason: str) -> Disposition:
        self._dead_letter(delivery, reason)
        return Disposition.ACK

    def _apply(self, delivery: Delivery, cmd: ApplyResult) -> Disposition:
        try:
            outcome = self.bus.handle(cmd)
        except Exception as exc:
            return self._failed(delivery, cmd, exc)
        FAILURE_LOG.recovered("applying a result")
        self._applied(cmd, outcome)
        return Disposition.ACK

    def _applied(self, cmd: ApplyResult, outcome: str) -> None:
        if outcome == UNKNOWN_GENERATION:
            log.warning("result for unknown generation %s (job %s)",
                        cmd.generation_id, cmd.job_id)
            self.observer.count("results", event_type=cmd.event_type, outcome=outcome)

    def _failed(self, delivery: Delivery, cmd: ApplyResult, exc: Exception) -> Disposition:
        cause = classify(exc)
        detail = f"{type(exc).__name__}: {exc}"[:500]
        attempt = attempts_of(delivery) + 1
        if cause == "transient" and self.retry.allows(attempt):
            FAILURE_LOG.failed("applying a result", f"{detail}; retry {attempt} of "
                               f"{self.retry.max_attempts}")
            return self._redeliver_later(delivery, attempt)
        label = "permanent"
        if cause == "transient":
            label = "budget"
            reason = (f"retry_budget_exhausted: {attempt - 1} retries, last {detail}")
        else:
            reason = f"processing_error: {detail}"
            if FAILURE_LOG.failed("processing a result", f"{cmd.generation_id}: {detail}",
                                  level=logging.ERROR):
                log.error("the failure behind it", exc_info=exc)
        self._park(cmd.generation_id, reason, label)
        self._dead_letter(delivery, reason)
        return Disposition.ACK

    def _redeliver_later(self, delivery: Delivery, attempt: int) -> Disposition:
        delay = self.retry.delay(attempt)
        settle = delivery.settle
        if settle is None:  # handed in by hand: nobody could settle it later
            time.sleep(delay)
            return self._redeliver(delivery, attempt)
        job = functools.partial(self._redeliver_deferred, delivery, attempt, settle)
        if not self.later.call_later(delay, job):
            log.debug("stopping: result %s left unacked for the broker to redeliver",
                      delivery.message_id)
        return Disposition.DEFERRED

    def _redeliver_deferred(self, delivery: Delivery, attempt: int,
                            settle: Callable[[Disposition], None]) -> None:
        """On the timer's thread, once the backoff is over."""
        settle(self._redeliver(delivery, attempt))

    def _redeliver(self, delivery: Delivery, attempt: int) -> Disposition:
        """Republish with the new count, confirmed: then the original may be acked."""
        try:
            self.broker.redeliver(delivery, {ATTEMPTS_HEADER: attempt})
        except Exception as pub_exc:  # broker trouble too: hand it back unchanged
            FAILURE_LOG.failed("republishing a result", str(pub_exc))
            return Disposition.RETRY
        self.observer.count("result_redeliveries")
        return Disposition.ACK

    def _park(self, generation_id: str, reason: str, cause: str) -> None:
        try:
            self.bus.handle(Park(generation_id, "result", reason, cause))
        except Exception as exc:  # the database is down too: the dead letter still keeps it
            FAILURE_LOG.failed("parking a saga", f"{generation_id}: {exc}")

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.tracer.span_event("message refused", reason=reason)
        self.observer.count("dead_lettered", reason=reason.split(":")[0])
        FAILURE_LOG.failed("results dead-lettered", reason[:200])
        self.broker.dead_letter(delivery, reason)


def _trace_source(delivery: Delivery) -> tuple[Any, str | None]:
    """(parent, generation id) of a delivery: the body's ``trace`` (n8n copies the job's),
    else the AMQP ``traceparent`` header. Parses the body a second time, only with tracing
    on; anything malformed just starts a new trace (``parse_result`` decides refusals)."""
    data: Any = None
    if len(delivery.body) <= MAX_RESULT_BYTES:
        try:
            data = loads_bounded(delivery.body, MAX_RESULT_DEPTH)
        except (JsonInvalid, JsonTooDeep):
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
        data: Any = loads_bounded(body, MAX_RESULT_DEPTH)
    except JsonTooDeep:
        return f"schema: body: nested deeper than {MAX_RESULT_DEPTH} levels"
    except JsonInvalid:
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
