"""Making a transition durable: fire a trigger, then turn its intents into rows.

:func:`transition` fires one trigger and hands the intents the callbacks recorded to
:func:`apply_intents`, which looks each intent's type up in :data:`APPLIERS` — one small
function per intent type — to write credit steps, outbox rows and history rows through the
unit of work. A new intent type needs one function and one row in that table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from saga import intents as it
from saga import triggers as tg
from saga.errors import BillingUnavailable, CommitInFlight, ConcurrencyConflict
from saga.machine import fire
from saga.messages import (
    OutboundMessage,
    job_message,
    notification_message,
    state_changed_message,
)
from saga.model import Generation, SagaConfig
from saga.observer import NullObserver, Observer
from saga.ports import HoldRequest, UnitOfWork
from saga.pricing import ZERO, fmt, month_key
from saga.retry import RetryPolicy
from saga.tracing import NullTracer, Tracer

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Context:
    """What every handler needs: a unit of work per call, the rules, a clock, metrics."""

    uow_factory: Callable[[], UnitOfWork]
    config: SagaConfig
    clock: Callable[[], datetime] = utcnow
    observer: Observer = field(default_factory=NullObserver)
    max_conflict_retries: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # AIGEN_RETRY_* (saga/retry.py)
    tracer: Tracer = field(default_factory=NullTracer)

    def retrying(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` again when another writer moved the saga on meanwhile."""
        for _ in range(self.max_conflict_retries - 1):
            try:
                return attempt()
            except ConcurrencyConflict:
                self.observer.count("concurrency_conflicts")
        return attempt()


def transition(ctx: Context, uow: UnitOfWork, saga: Generation, payload: tg.Trigger,
               actor: it.Actor, now: datetime, plan: str | None = None) -> bool:
    """Fire ``payload`` and make its intents durable, in a ``transition <trigger>`` span."""
    with ctx.tracer.span("transition " + payload.name, generation_id=saga.id,
                         trigger=payload.name, from_state=saga.state,
                         attempt=saga.attempt) as span:
        fired = _transition(ctx, uow, saga, payload, actor, now, plan)
        span.set_attribute("aigen.to_state", saga.state)
        return fired


def _transition(ctx: Context, uow: UnitOfWork, saga: Generation, payload: tg.Trigger,
                actor: it.Actor, now: datetime, plan: str | None = None) -> bool:
    """Fire ``payload`` and make its intents durable; False if a guard refused it.

    When a release cannot reach the external billing backend, the transition is undone
    and the saga waits in ``compensating`` instead, retried by the sweeper.
    """
    snapshot = copy.deepcopy(saga) if uow.billing.may_be_unavailable else None
    state = saga.state
    if not fire(saga, payload, now=now, actor=actor, config=ctx.config):
        return False
    pending = saga.take_pending()
    _refuse_releasing_sent_commits(uow, pending, state)
    for intent in pending:
        if not isinstance(intent, it.Commit | it.Release):
            continue
        commit = isinstance(intent, it.Commit)
        try:
            uow.billing.prepare_settle(intent.hold_id, commit=commit)
        except BillingUnavailable:
            if commit or snapshot is None:
                raise  # nothing changes; the caller retries (a result goes back to the queue)
            _defer_compensation(ctx, uow, saga, snapshot, payload, actor, now)
            return True
    apply_intents(ctx, uow, saga, pending, now, plan=plan)
    ctx.observer.count("transitions", trigger=payload.name)
    return True


def _refuse_releasing_sent_commits(uow: UnitOfWork, pending: list[it.Intent],
                                   state: str) -> None:
    """Raise :class:`CommitInFlight` (nothing sent, the caller must not save ``saga``) when a
    release in ``pending`` is of a hold whose commit external billing may already have made:
    a release would be refused (409) or, worse, undo a charge for delivered work."""
    releases = [i.hold_id for i in pending if isinstance(i, it.Release)]
    sent = uow.billing.commit_sent(releases) if releases else set()
    if sent:
        raise CommitInFlight(sorted(sent), state=state)


def _defer_compensation(ctx: Context, uow: UnitOfWork, saga: Generation, snapshot: Generation,
                        payload: tg.Trigger, actor: it.Actor, now: datetime) -> None:
    target = saga.state
    saga.__dict__.update(copy.deepcopy(snapshot).__dict__)
    if saga.state == "compensating":  # a retry of the release failed again
        assert saga.compensation is not None  # a compensating saga always has one
        comp = replace(saga.compensation, tries=saga.compensation.tries + 1)
        saga.compensation = comp
        saga.due_at = now + ctx.config.compensation_delay(comp.tries)
        saga.note(actor, {"compensation": "billing backend still unavailable",
                          "tries": comp.tries})
        ctx.observer.count("compensation_retries")
        if not ctx.config.compensation_policy().allows(comp.tries):
            apply_intents(ctx, uow, saga, saga.take_pending(), now)
            park(ctx, uow, saga.id, "compensation",
                 f"retry budget exhausted: billing did not answer {comp.tries} releases",
                 now, cause="budget")
            return
    else:
        error = payload.error if isinstance(payload, tg.ResultFailed | tg.Compensated) else None
        fire(saga, tg.BillingUnavailable(
            target=target, original_trigger=payload.name, error=error,
            detail={"reason": "billing backend unavailable", "target": target}),
            now=now, actor=actor, config=ctx.config)
        ctx.observer.count("compensations")
    apply_intents(ctx, uow, saga, saga.take_pending(), now)


def park(ctx: Context, uow: UnitOfWork, generation_id: str, kind: str, reason: str,
         now: datetime, *, cause: str) -> bool:
    """Park a saga in ``uow`` (plain SQL by id): it keeps its state and holds, the sweeper
    skips it, support sees it in the attention list. ``cause``: a metric label."""
    parked = uow.generations.park(generation_id, kind, reason, now)
    if parked:
        ctx.observer.count("parked", kind=kind, cause=cause)
    return parked


# ------------------------------------------------------------------ intents -> rows
@dataclass(frozen=True)
class Applying:
    """Where the intents of one transition are written."""

    ctx: Context
    uow: UnitOfWork
    saga: Generation
    now: datetime
    plan: str | None

    def history(self, entry: it.HistoryEntry) -> None:
        self.saga.history_seq += 1
        trace_id = self.ctx.tracer.current_trace_id()
        if trace_id is not None:
            entry = replace(entry, trace_id=trace_id)
        self.uow.history.append(self.saga.id, self.saga.history_seq, self.now, entry)

    def credit(self, op: str, hold_id: str | None, amount: Decimal, stage: str) -> None:
        self.history(it.HistoryEntry(
            kind="credit", actor="system",
            detail={"op": op, "hold_id": hold_id, "amount": fmt(amount), "stage": stage}))
        self.ctx.observer.count("credits", op=op)

    def credit_span(self, step: str, amount: Decimal, stage: str
                    ) -> AbstractContextManager[Any]:
        """A ``credits <step>`` span: CLIENT when an external billing backend answers it."""
        return self.ctx.tracer.span(
            "credits " + step, kind="client" if self.uow.billing.may_be_unavailable
            else "internal", generation_id=self.saga.id, step=step, amount=amount,
            stage=stage)  # the tracer formats the amount, only when tracing is on

    def send(self, msg: OutboundMessage, **detail: Any) -> None:
        traceparent = self.ctx.tracer.current_traceparent()
        if traceparent is not None:  # the relay's publish span continues this trace
            msg = replace(msg, traceparent=traceparent)
        self.uow.outbox.add(msg, self.now)
        self.history(it.HistoryEntry(
            kind="message_out", actor="system",
            detail={"exchange": msg.exchange, "routing_key": msg.routing_key,
                    "event_type": msg.type, "event_id": msg.message_id, **detail}))


def _reserve(a: Applying, intent: it.Reserve) -> None:
    prices = a.ctx.config.prices
    quota = (prices.free_monthly_sample_rounds
             if prices.quota_applies(a.plan or "free", intent.stage) else None)
    with a.credit_span("reserve", intent.amount, intent.stage):
        a.uow.billing.reserve(
            HoldRequest(intent.hold_id, a.saga.user_id, a.saga.id, intent.stage,
                        intent.amount, a.now),
            quota=quota, month=month_key(a.now.year, a.now.month))
    a.credit("reserve", intent.hold_id, intent.amount, intent.stage)


def _commit(a: Applying, intent: it.Commit) -> None:
    with a.credit_span("commit", intent.amount, intent.stage):
        settled = a.uow.billing.settle(intent.hold_id, commit=True, at=a.now)
    if settled:
        a.credit("commit", intent.hold_id, intent.amount, intent.stage)
    else:
        a.saga.charged -= intent.amount  # the model counted it; nothing was charged
        _credit_skipped(a, "commit", intent.hold_id, intent.amount, intent.stage)


def _release(a: Applying, intent: it.Release) -> None:
    with a.credit_span("release", intent.amount, intent.stage):
        settled = a.uow.billing.settle(intent.hold_id, commit=False, at=a.now)
    if settled:
        a.credit("release", intent.hold_id, intent.amount, intent.stage)
    else:
        a.saga.released -= intent.amount
        _credit_skipped(a, "release", intent.hold_id, intent.amount, intent.stage)


def _credit_skipped(a: Applying, op: str, hold_id: str, amount: Decimal, stage: str) -> None:
    """The hold was no longer open (settled outside the saga): record that, claim nothing.

    The transition still goes ahead — the user gets the result or the cancellation; only the
    money step did not happen here — so the history says so with a ``note`` instead of a
    ``credit`` step, the saga's credit summary counts only what it moved, and the metric
    ``credits{op="<op>_skipped"}`` lets support find it.
    """
    a.history(it.HistoryEntry(kind="note", actor="system", detail={
        "credit_skipped": op, "hold_id": hold_id, "amount": fmt(amount), "stage": stage,
        "reason": "hold_not_open"}))
    a.ctx.observer.count("credits", op=f"{op}_skipped")


def _waive(a: Applying, intent: it.Waive) -> None:
    a.credit("waived", None, ZERO, intent.stage)


def _dispatch(a: Applying, intent: it.DispatchJob) -> None:
    cfg = a.ctx.config
    a.send(job_message(a.saga, stage=intent.stage, job_id=intent.job_id,
                       attempt=intent.attempt, now=a.now, bucket=cfg.bucket,
                       sample_size=cfg.sample_size,
                       traceparent=a.ctx.tracer.current_traceparent()),
           job_id=intent.job_id, stage=intent.stage, attempt=intent.attempt)


def _notify(a: Applying, intent: it.Notify) -> None:
    a.send(notification_message(a.saga, type_=intent.type, message=intent.message,
                                data=intent.data, now=a.now), type=intent.type)


def _state_changed(a: Applying, intent: it.PublishStateChanged) -> None:
    a.send(state_changed_message(a.saga, from_state=intent.from_state,
                                 to_state=intent.to_state, now=a.now))


APPLIERS: dict[type[Any], Callable[[Applying, Any], None]] = {
    it.HistoryEntry: Applying.history,
    it.Reserve: _reserve,
    it.Commit: _commit,
    it.Release: _release,
    it.Waive: _waive,
    it.DispatchJob: _dispatch,
    it.Notify: _notify,
    it.PublishStateChanged: _state_changed,
}


def apply_intents(ctx: Context, uow: UnitOfWork, saga: Generation, pending: list[it.Intent],
                  now: datetime, plan: str | None = None) -> None:
    """Write ``pending`` in order, then save the saga (optimistic version check)."""
    applying = Applying(ctx, uow, saga, now, plan)
    for intent in pending:
        APPLIERS[type(intent)](applying, intent)
    if saga.due_at != saga.traced_due_at:  # a timer (re-)armed here: its fire span joins us
        saga.due_traceparent = ctx.tracer.current_traceparent() if saga.due_at else None
        saga.traced_due_at = saga.due_at
    uow.generations.save(saga)
