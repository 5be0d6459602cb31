"""Command handlers shared by the REST API, the result consumer and the deadline sweeper.

Every handler runs one unit of work: load (and lock) the saga, fire one trigger, turn the
intents the transition recorded into credit steps, history rows and outbox rows, and commit
all of it in one database transaction. Nothing is sent from here: the outbox relay does that.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from saga import intents as it
from saga.commands import (
    ApplyResult,
    Cancel,
    Grant,
    Regenerate,
    SelectSample,
    SetPlan,
    StartGeneration,
)
from saga.errors import (
    BillingUnavailable,
    ConcurrencyConflict,
    DomainError,
    InvalidRequest,
    InvalidState,
    NotFound,
)
from saga.machine import MACHINE, fire
from saga.messages import (
    OutboundMessage,
    job_message,
    notification_message,
    state_changed_message,
)
from saga.model import Generation, SagaConfig, new_id
from saga.ports import AlreadyAnswered, HoldRequest, IdempotencyRecord, UnitOfWork
from saga.pricing import PLANS, ZERO, fmt, money, month_key
from saga.views import account_view, generation_view

T = TypeVar("T")

RESULT_TRIGGERS = {
    "AIGenerationSamplesReady": "samples_ready",
    "AIGenerationFinalAssetReady": "final_ready",
    "AIGenerationFailed": "result_failed",
}

# Outcomes of :meth:`SagaService.apply_result`, also used as metric labels.
APPLIED = "applied"
UNKNOWN_GENERATION = "unknown_generation"


class Observer(Protocol):
    """Receives counters for metrics; the composition root plugs Prometheus in."""

    def count(self, name: str, **labels: str) -> None: ...


class _NullObserver:
    def count(self, name: str, **labels: str) -> None:
        return None


def utcnow() -> datetime:
    return datetime.now(UTC)


class SagaService:
    """The application service: one public method per command or query."""

    max_conflict_retries = 8

    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        config: SagaConfig,
        clock: Callable[[], datetime] = utcnow,
        observer: Observer | None = None,
    ) -> None:
        self.uow_factory = uow_factory
        self.config = config
        self.clock = clock
        self.observer: Observer = observer or _NullObserver()

    # ------------------------------------------------------------------ commands (Odoo)
    def start(self, cmd: StartGeneration, idem: IdempotencyRecord | None = None) -> dict[str, Any]:
        now = self.clock()
        saga = Generation(
            id=new_id(), user_id=cmd.user_id, prompt=cmd.prompt, format=dict(cmd.format),
            created_at=now, updated_at=now, project_id=cmd.project_id,
            negative_prompt=cmd.negative_prompt, style=dict(cmd.style), brand=dict(cmd.brand),
            input_assets=list(cmd.input_assets), sample_count=cmd.sample_count,
            metadata=dict(cmd.metadata),
        )
        with self.uow_factory() as uow:
            self._replay_guard(uow, idem)
            plan = self._plan(uow, cmd.user_id)
            price = self.config.prices.price(plan, "samples")
            uow.generations.add(saga)
            self._transition(uow, saga, "start", "odoo", now, plan=plan, price=price)
            view = generation_view(saga)
            if idem:
                uow.idempotency.put(idem, 202, view, now)
            uow.commit()
        return view

    def select(self, cmd: SelectSample, idem: IdempotencyRecord | None = None) -> dict[str, Any]:
        def prepare(uow: UnitOfWork, saga: Generation) -> dict[str, Any]:
            plan = self._plan(uow, saga.user_id)
            price = self.config.prices.price(plan, "final", "high" if cmd.resolution == "high"
                                             else "standard")
            return {"plan": plan, "price": price, "sample_id": cmd.sample_id,
                    "resolution": cmd.resolution,
                    "detail": {"sample_id": cmd.sample_id, "resolution": cmd.resolution}}

        return self._steer(cmd.generation_id, "select", prepare, idem, 202)

    def regenerate(self, cmd: Regenerate,
                   idem: IdempotencyRecord | None = None) -> dict[str, Any]:
        def prepare(uow: UnitOfWork, saga: Generation) -> dict[str, Any]:
            plan = self._plan(uow, saga.user_id)
            return {"plan": plan, "price": self.config.prices.price(plan, "samples"),
                    "prompt": cmd.prompt, "detail": {"new_prompt": cmd.prompt is not None}}

        return self._steer(cmd.generation_id, "regenerate", prepare, idem, 202)

    def cancel(self, cmd: Cancel, idem: IdempotencyRecord | None = None) -> dict[str, Any]:
        def prepare(uow: UnitOfWork, saga: Generation) -> dict[str, Any]:
            return {"detail": {"reason": cmd.reason} if cmd.reason else {}}

        return self._steer(cmd.generation_id, "cancel", prepare, idem, 200)

    def _steer(self, generation_id: str, trigger: str,
               prepare: Callable[[UnitOfWork, Generation], dict[str, Any]],
               idem: IdempotencyRecord | None, status: int) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            now = self.clock()
            with self.uow_factory() as uow:
                self._replay_guard(uow, idem)
                saga = uow.generations.get(generation_id, for_update=True)
                if saga is None:
                    raise NotFound(f"generation {generation_id} not found")
                if trigger not in MACHINE.get_triggers(saga.state):
                    raise InvalidState(
                        f"cannot {trigger} a generation in state {saga.state!r}",
                        state=saga.state)
                kwargs = prepare(uow, saga)
                if not self._transition(uow, saga, trigger, "odoo", now, **kwargs):
                    raise InvalidState(f"cannot {trigger} this generation now", state=saga.state)
                view = generation_view(saga)
                if idem:
                    uow.idempotency.put(idem, status, view, now)
                uow.commit()
                return view

        try:
            return self._retrying(attempt)
        except DomainError as exc:
            if not isinstance(exc, NotFound):
                self._record_refusal(generation_id, trigger, exc)
            raise

    def _record_refusal(self, generation_id: str, trigger: str, exc: DomainError) -> None:
        """Support sees refused calls in the history; nothing else changes."""

        def attempt() -> None:
            with self.uow_factory() as uow:
                saga = uow.generations.get(generation_id, for_update=True)
                if saga is None:
                    return
                saga.reject("odoo", exc.code, trigger=trigger, message=exc.message)
                self._apply(uow, saga, saga.take_pending(), self.clock())
                uow.commit()

        self._retrying(attempt)

    # ------------------------------------------------------------------ results (n8n)
    def apply_result(self, cmd: ApplyResult) -> str:
        """Apply one result from n8n; return ``applied`` or the reason it was refused."""
        return self._retrying(lambda: self._apply_result_once(cmd))

    def _apply_result_once(self, cmd: ApplyResult) -> str:
        now = self.clock()
        with self.uow_factory() as uow:
            saga = uow.generations.get(cmd.generation_id, for_update=True)
            if saga is None:
                return UNKNOWN_GENERATION
            received = it.HistoryEntry(kind="message_in", actor="n8n",
                                       detail=_result_detail(cmd))
            if cmd.event_type == "AIGenerationProgress":
                outcome = self._progress(saga, cmd, received, now)
                self._apply(uow, saga, saga.take_pending(), now)
            else:
                outcome = self._result(uow, saga, cmd, received, now)
            uow.commit()
        self.observer.count("results", event_type=cmd.event_type, outcome=outcome)
        return outcome

    def _progress(self, saga: Generation, cmd: ApplyResult, received: it.HistoryEntry,
                  now: datetime) -> str:
        # Progress changes nothing and is not deduplicated; only the current job's counts.
        saga.pending.append(received)
        if cmd.job_id != saga.job_id:
            saga.reject("n8n", "stale_job", event_type=cmd.event_type, job_id=cmd.job_id)
            return "stale_job"
        percent = max(0, min(100, int(cmd.percent or 0)))
        saga.pending.append(it.Notify("progress", f"Working on it: {percent}%",
                                      {"percent": percent, "stage": saga.stage}))
        return APPLIED

    def _result(self, uow: UnitOfWork, saga: Generation, cmd: ApplyResult,
                received: it.HistoryEntry, now: datetime) -> str:
        saga.pending.append(received)
        trigger = RESULT_TRIGGERS[cmd.event_type]
        reason: str | None = None
        if not uow.inbox.add(cmd.job_id, cmd.event_type, saga.id, now):
            reason = "duplicate"
        elif trigger not in MACHINE.get_triggers(saga.state) or saga.state == "compensating":
            reason = "wrong_state"
        elif cmd.job_id != saga.job_id:
            reason = "stale_job"
        if reason is None:
            kwargs: dict[str, Any] = {"detail": {"job_id": cmd.job_id, "attempt": saga.attempt}}
            if trigger == "samples_ready":
                kwargs["samples"] = cmd.samples or []
            elif trigger == "final_ready":
                kwargs["asset"] = cmd.asset or {}
            else:
                kwargs["error"] = cmd.error or {}
                kwargs["detail"]["error"] = cmd.error
            if self._transition(uow, saga, trigger, "n8n", now, **kwargs):
                return APPLIED
            reason = "refused_by_guard"
        saga.reject("n8n", reason, event_type=cmd.event_type, job_id=cmd.job_id,
                    state=saga.state)
        self._apply(uow, saga, saga.take_pending(), now)
        return reason

    # ------------------------------------------------------------------ timers
    def fire_due(self, limit: int = 200) -> int:
        """Fire every passed deadline (at most ``limit``); each in its own transaction."""
        fired = 0
        while fired < limit:
            if not self._retrying(self._fire_one_due):
                break
            fired += 1
        return fired

    def _fire_one_due(self) -> bool:
        now = self.clock()
        with self.uow_factory() as uow:
            saga = uow.generations.claim_due(now)
            if saga is None:
                return False
            kind = saga.due_kind
            timers: dict[str, tuple[str, dict[str, Any]]] = {
                "retry": ("redispatch", {}),
                "compensate": ("compensated",
                               {"error": (saga.compensation or {}).get("error") or {}}),
            }
            trigger, kwargs = timers.get(str(kind), ("timeout", {}))
            try:
                fired = self._transition(uow, saga, trigger, "timer", now, **kwargs)
            except InvalidState:
                fired = False
            if not fired:
                # A timer the saga no longer accepts must not be claimed again and again.
                saga.due_at = saga.due_kind = None
                saga.note("timer", {"ignored_timer": kind, "state": saga.state})
                self._apply(uow, saga, saga.take_pending(), now)
            self.observer.count("deadlines", kind=str(kind))
            uow.commit()
            return True

    # ------------------------------------------------------------------ queries
    def get(self, generation_id: str) -> dict[str, Any]:
        with self.uow_factory() as uow:
            saga = uow.generations.get(generation_id)
        if saga is None:
            raise NotFound(f"generation {generation_id} not found")
        return generation_view(saga)

    def list_generations(self, *, user_id: str | None, state: str | None, limit: int,
             after: tuple[datetime, str] | None) -> tuple[list[dict[str, Any]],
                                                          tuple[datetime, str] | None]:
        with self.uow_factory() as uow:
            sagas = uow.generations.search(user_id=user_id, state=state, limit=limit + 1,
                                         after=after)
        more = len(sagas) > limit
        sagas = sagas[:limit]
        cursor = (sagas[-1].created_at, sagas[-1].id) if more and sagas else None
        return [generation_view(s) for s in sagas], cursor

    def history(self, generation_id: str) -> dict[str, Any]:
        with self.uow_factory() as uow:
            saga = uow.generations.get(generation_id)
            if saga is None:
                raise NotFound(f"generation {generation_id} not found")
            events = uow.history.events(generation_id)
        return {"id": saga.id, "state": saga.state, "events": events}

    # ------------------------------------------------------------------ accounts
    def account(self, user_id: str) -> dict[str, Any]:
        with self.uow_factory() as uow:
            account = uow.billing.account(user_id)
        if account is None:
            raise NotFound(f"account {user_id} not found")
        return account_view(account)

    def set_plan(self, cmd: SetPlan, idem: IdempotencyRecord | None = None) -> dict[str, Any]:
        if cmd.plan not in PLANS:
            raise InvalidRequest(f"unknown plan {cmd.plan!r}", field="plan")

        def attempt() -> dict[str, Any]:
            now = self.clock()
            with self.uow_factory() as uow:
                self._replay_guard(uow, idem)
                view = account_view(uow.billing.set_plan(cmd.user_id, cmd.plan, now))
                if idem:
                    uow.idempotency.put(idem, 200, view, now)
                uow.commit()
            return view

        return self._retrying(attempt)

    def grant(self, cmd: Grant, idem: IdempotencyRecord | None = None) -> dict[str, Any]:
        amount = money(cmd.amount)
        if amount <= ZERO:
            raise InvalidRequest("amount must be greater than 0.00", field="amount")

        def attempt() -> dict[str, Any]:
            now = self.clock()
            with self.uow_factory() as uow:
                self._replay_guard(uow, idem)
                account = uow.billing.grant(cmd.user_id, amount, cmd.reason, now)
                view = {**account_view(account), "grant": {"amount": fmt(amount),
                                                            "reason": cmd.reason}}
                if idem:
                    uow.idempotency.put(idem, 201, view, now)
                uow.commit()
            return view

        return self._retrying(attempt)

    # ------------------------------------------------------------------ idempotency
    @staticmethod
    def _replay_guard(uow: UnitOfWork, idem: IdempotencyRecord | None) -> None:
        """Checked inside the command's own transaction: one round trip, no extra one."""
        if idem is not None:
            stored = uow.idempotency.get(idem)
            if stored is not None:
                raise AlreadyAnswered(stored)

    def idempotent_response(self, idem: IdempotencyRecord) -> tuple[str, int, Any] | None:
        with self.uow_factory() as uow:
            return uow.idempotency.get(idem)

    def remember_response(self, idem: IdempotencyRecord, status: int, body: Any) -> None:
        """Store a refusal's response under its key (successes are stored in their own UoW)."""
        with self.uow_factory() as uow:
            uow.idempotency.put(idem, status, body, self.clock())
            uow.commit()

    # ------------------------------------------------------------------ machinery
    def _retrying(self, attempt: Callable[[], T]) -> T:
        for _ in range(self.max_conflict_retries - 1):
            try:
                return attempt()
            except ConcurrencyConflict:
                self.observer.count("concurrency_conflicts")
        return attempt()

    def _plan(self, uow: UnitOfWork, user_id: str) -> str:
        account = uow.billing.account(user_id)
        return account.plan if account else "free"

    def _transition(self, uow: UnitOfWork, saga: Generation, trigger: str, actor: it.Actor,
                    now: datetime, plan: str | None = None, **kwargs: Any) -> bool:
        """Fire ``trigger`` and make its intents durable; False if a guard refused it.

        When a release cannot reach the external billing backend, the transition is undone
        and the saga waits in ``compensating`` instead, retried by the sweeper.
        """
        snapshot = copy.deepcopy(saga) if uow.billing.may_be_unavailable else None
        if not fire(saga, trigger, now=now, actor=actor, config=self.config, **kwargs):
            return False
        pending = saga.take_pending()
        for intent in pending:
            if not isinstance(intent, it.Commit | it.Release):
                continue
            commit = isinstance(intent, it.Commit)
            try:
                uow.billing.prepare_settle(intent.hold_id, commit=commit)
            except BillingUnavailable:
                if commit or snapshot is None:
                    raise  # nothing changes; the caller retries (a result goes back to the queue)
                self._defer_compensation(uow, saga, snapshot, trigger, actor, now, kwargs)
                return True
        self._apply(uow, saga, pending, now, plan=plan)
        self.observer.count("transitions", trigger=trigger)
        return True

    def _defer_compensation(self, uow: UnitOfWork, saga: Generation, snapshot: Generation,
                            trigger: str, actor: it.Actor, now: datetime,
                            kwargs: dict[str, Any]) -> None:
        target = saga.state
        saga.__dict__.update(copy.deepcopy(snapshot).__dict__)
        if saga.state == "compensating":  # a retry of the release failed again
            comp = dict(saga.compensation or {})
            comp["tries"] = int(comp.get("tries", 1)) + 1
            saga.compensation = comp
            saga.due_at = now + self.config.compensation_delay(comp["tries"])
            saga.note(actor, {"compensation": "billing backend still unavailable",
                              "tries": comp["tries"]})
            self.observer.count("compensation_retries")
        else:
            fire(saga, "billing_unavailable", now=now, actor=actor, config=self.config,
                 target=target, original_trigger=trigger, error=kwargs.get("error"),
                 detail={"reason": "billing backend unavailable", "target": target})
            self.observer.count("compensations")
        self._apply(uow, saga, saga.take_pending(), now)

    def _apply(self, uow: UnitOfWork, saga: Generation, pending: list[it.Intent],
               now: datetime, plan: str | None = None) -> None:
        cfg = self.config
        for intent in pending:
            if isinstance(intent, it.HistoryEntry):
                self._history(uow, saga, now, intent)
            elif isinstance(intent, it.Reserve):
                quota = (cfg.prices.free_monthly_sample_rounds
                         if cfg.prices.quota_applies(plan or "free", intent.stage)
                         else None)
                uow.billing.reserve(
                    HoldRequest(intent.hold_id, saga.user_id, saga.id, intent.stage,
                                intent.amount, now),
                    quota=quota, month=month_key(now.year, now.month))
                self._credit(uow, saga, now, "reserve", intent.hold_id, intent.amount,
                             intent.stage)
            elif isinstance(intent, it.Commit | it.Release):
                commit = isinstance(intent, it.Commit)
                uow.billing.settle(intent.hold_id, commit=commit, at=now)
                self._credit(uow, saga, now, "commit" if commit else "release", intent.hold_id,
                             intent.amount, intent.stage)
            elif isinstance(intent, it.Waive):
                self._credit(uow, saga, now, "waived", None, ZERO, intent.stage)
            elif isinstance(intent, it.DispatchJob):
                self._send(uow, saga, now, job_message(
                    saga, stage=intent.stage, job_id=intent.job_id, attempt=intent.attempt,
                    now=now, bucket=cfg.bucket, sample_size=cfg.sample_size),
                    job_id=intent.job_id, stage=intent.stage, attempt=intent.attempt)
            elif isinstance(intent, it.Notify):
                self._send(uow, saga, now, notification_message(
                    saga, type_=intent.type, message=intent.message, data=intent.data, now=now),
                    type=intent.type)
            elif isinstance(intent, it.PublishStateChanged):
                self._send(uow, saga, now, state_changed_message(
                    saga, from_state=intent.from_state, to_state=intent.to_state, now=now))
        uow.generations.save(saga)

    def _history(self, uow: UnitOfWork, saga: Generation, now: datetime,
                 entry: it.HistoryEntry) -> None:
        saga.history_seq += 1
        uow.history.append(saga.id, saga.history_seq, now, entry)

    def _credit(self, uow: UnitOfWork, saga: Generation, now: datetime, op: str,
                hold_id: str | None, amount: Any, stage: str) -> None:
        self._history(uow, saga, now, it.HistoryEntry(
            kind="credit", actor="system",
            detail={"op": op, "hold_id": hold_id, "amount": fmt(amount), "stage": stage}))
        self.observer.count("credits", op=op)

    def _send(self, uow: UnitOfWork, saga: Generation, now: datetime, msg: OutboundMessage,
              **detail: Any) -> None:
        uow.outbox.add(msg, now)
        self._history(uow, saga, now, it.HistoryEntry(
            kind="message_out", actor="system",
            detail={"exchange": msg.exchange, "routing_key": msg.routing_key,
                    "event_type": msg.type, "event_id": msg.message_id, **detail}))


def _result_detail(cmd: ApplyResult) -> dict[str, Any]:
    detail: dict[str, Any] = {"event_type": cmd.event_type, "job_id": cmd.job_id}
    if cmd.event_id:
        detail["event_id"] = cmd.event_id
    if cmd.error is not None:
        detail["error"] = cmd.error
    if cmd.percent is not None:
        detail["percent"] = cmd.percent
    if cmd.samples is not None:
        detail["samples"] = len(cmd.samples)
    return detail


__all__ = ["APPLIED", "UNKNOWN_GENERATION", "SagaService"]
