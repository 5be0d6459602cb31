"""Command handlers shared by the REST API, the result consumer and the deadline sweeper.

One function per command (the table that routes commands to them is
:data:`saga.messagebus.HANDLERS`). Every handler runs one unit of work: load (and lock) the
saga, fire one trigger, make the intents durable (:mod:`saga.effects`) and commit all of it
in one database transaction. Nothing is sent from here: the outbox relay does that.

About 400 lines on purpose: the commands of Odoo, n8n and the timers with the helpers they
share (idempotency, refusal records); support staff's commands are in :mod:`saga.support`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from saga import intents as it
from saga import triggers as tg
from saga.commands import (
    ApplyResult,
    ApplyResults,
    Cancel,
    FireDeadlines,
    Grant,
    Regenerate,
    SelectSample,
    SetPlan,
    StartGeneration,
    StoreResponse,
)
from saga.effects import Context, apply_intents, park, transition
from saga.errors import (
    CommitInFlight,
    ConcurrencyConflict,
    DomainError,
    GenerationUnreadable,
    InvalidRequest,
    InvalidState,
    NotFound,
    UnloadableSaga,
)
from saga.failures import FAILURE_LOG
from saga.input_policy import check_asset_format, check_result_url, check_sample_id
from saga.machine import MACHINE
from saga.model import Generation, new_id
from saga.ports import AlreadyAnswered, IdempotencyRecord, Prefetch, UnitOfWork
from saga.pricing import PLANS, ZERO, Resolution, fmt, money, month_key
from saga.retry import classify
from saga.views import account_view, generation_view

View = dict[str, Any]

# Outcomes of :func:`apply_result`, also used as metric labels.
APPLIED = "applied"
UNKNOWN_GENERATION = "unknown_generation"
UNSAFE_RESULT = "unsafe_result"


# ------------------------------------------------------------------ idempotency
def idempotent(ctx: Context, idem: IdempotencyRecord | None, status: int,
               work: Callable[[UnitOfWork, datetime], View],
               reads: Callable[[datetime], Prefetch] | None = None) -> View:
    """Run ``work`` in one unit of work that also stores its response under ``idem``.

    The stored-response check runs inside the same transaction; a key that already has an
    answer raises :class:`AlreadyAnswered` and changes nothing. ``reads``: what ``work``
    will read (with the stored response), handed to the unit of work up front so it can
    read all of it in one round trip. Retried when another writer moved the saga on
    meanwhile.
    """

    def attempt() -> View:
        now = ctx.clock()
        with ctx.uow_factory() as uow:
            if reads is not None:
                uow.prefetch(reads(now))
            if idem is not None:
                stored = uow.idempotency.get(idem)
                if stored is not None:
                    raise AlreadyAnswered(stored)
            try:
                view = work(uow, now)
            except UnloadableSaga as exc:  # a corrupt row: a refusal, never a crash
                raise GenerationUnreadable.of(exc) from exc
            if idem is not None:
                uow.idempotency.put(idem, status, view, now)
            uow.commit()
        return view

    return ctx.retrying(attempt)


def _plan(uow: UnitOfWork, user_id: str) -> str:
    account = uow.billing.account(user_id)
    return account.plan if account else "free"


# ------------------------------------------------------------------ commands (Odoo)
def start_generation(ctx: Context, cmd: StartGeneration,
                     idem: IdempotencyRecord | None = None) -> View:
    saga_id = new_id()

    def work(uow: UnitOfWork, now: datetime) -> View:
        saga = Generation(
            id=saga_id, user_id=cmd.user_id, prompt=cmd.prompt, format=dict(cmd.format),
            created_at=now, updated_at=now, project_id=cmd.project_id,
            negative_prompt=cmd.negative_prompt, style=dict(cmd.style), brand=dict(cmd.brand),
            input_assets=list(cmd.input_assets), sample_count=cmd.sample_count,
            metadata=dict(cmd.metadata),
        )
        plan = _plan(uow, cmd.user_id)
        uow.generations.add(saga)
        transition(ctx, uow, saga, tg.Start(price=ctx.config.prices.price(plan, "samples")),
                   "odoo", now, plan=plan)
        return generation_view(saga)

    # The stored response, the account (locked: the start reserves on it) and the month's
    # sample rounds (the free plan's quota) in one read.
    return idempotent(ctx, idem, 202, work, lambda now: Prefetch(
        idempotency=idem, user_id=cmd.user_id, rounds_month=_month(now)))


def _month(now: datetime) -> str:
    return month_key(now.year, now.month)


def select_sample(ctx: Context, cmd: SelectSample,
                  idem: IdempotencyRecord | None = None) -> View:
    def payload(uow: UnitOfWork, saga: Generation) -> tuple[str, tg.Trigger]:
        plan = _plan(uow, saga.user_id)
        resolution: Resolution = "high" if cmd.resolution == "high" else "standard"
        return plan, tg.Select(
            sample_id=cmd.sample_id, resolution=resolution,
            price=ctx.config.prices.price(plan, "final", resolution),
            detail={"sample_id": cmd.sample_id, "resolution": cmd.resolution})

    return _steer(ctx, cmd.generation_id, "select", payload, idem, 202, reserves="final")


def regenerate(ctx: Context, cmd: Regenerate, idem: IdempotencyRecord | None = None) -> View:
    def payload(uow: UnitOfWork, saga: Generation) -> tuple[str, tg.Trigger]:
        plan = _plan(uow, saga.user_id)
        return plan, tg.Regenerate(price=ctx.config.prices.price(plan, "samples"),
                                   prompt=cmd.prompt,
                                   detail={"new_prompt": cmd.prompt is not None})

    return _steer(ctx, cmd.generation_id, "regenerate", payload, idem, 202,
                  reserves="samples")


def cancel(ctx: Context, cmd: Cancel, idem: IdempotencyRecord | None = None) -> View:
    def payload(uow: UnitOfWork, saga: Generation) -> tuple[str | None, tg.Trigger]:
        return None, tg.Cancel(detail={"reason": cmd.reason} if cmd.reason else {})

    return _steer(ctx, cmd.generation_id, "cancel", payload, idem, 200)


def _steer(ctx: Context, generation_id: str, trigger: str,
           payload: Callable[[UnitOfWork, Generation], tuple[str | None, tg.Trigger]],
           idem: IdempotencyRecord | None, status: int, reserves: str | None = None) -> View:
    """An Odoo command on an existing saga; a refusal is recorded in its history.

    ``reserves``: the stage the command reserves credits for, if any; its owner's account
    is then read (and locked, after the saga) with the saga and the stored response."""

    def work(uow: UnitOfWork, now: datetime) -> View:
        saga = uow.generations.get(generation_id, for_update=True)
        if saga is None:
            raise NotFound(f"generation {generation_id} not found")
        plan, fired = payload(uow, saga)
        if not transition(ctx, uow, saga, fired, "odoo", now, plan=plan):
            raise InvalidState(f"cannot {trigger} this generation now", state=saga.state)
        return generation_view(saga)

    def reads(now: datetime) -> Prefetch:
        return Prefetch(idempotency=idem, generation_id=generation_id,
                        owner_account=reserves is not None,
                        rounds_month=_month(now) if reserves == "samples" else None)

    try:
        return idempotent(ctx, idem, status, work, reads)
    except DomainError as exc:
        # An unreadable saga cannot be loaded to note the refusal in: the 409 says it all.
        if not isinstance(exc, NotFound | GenerationUnreadable):
            _record_refusal(ctx, generation_id, trigger, exc)
        raise


def _record_refusal(ctx: Context, generation_id: str, trigger: str, exc: DomainError) -> None:
    """Support sees refused calls in the history; nothing else changes."""

    def attempt() -> None:
        with ctx.uow_factory() as uow:
            saga = uow.generations.get(generation_id, for_update=True)
            if saga is None:
                return
            saga.reject("odoo", exc.code, trigger=trigger, message=exc.message)
            apply_intents(ctx, uow, saga, saga.take_pending(), ctx.clock())
            uow.commit()

    ctx.retrying(attempt)


# ------------------------------------------------------------------ accounts
def set_plan(ctx: Context, cmd: SetPlan, idem: IdempotencyRecord | None = None) -> View:
    if cmd.plan not in PLANS:
        raise InvalidRequest(f"unknown plan {cmd.plan!r}", field="plan")
    return idempotent(ctx, idem, 200, lambda uow, now: account_view(
        uow.billing.set_plan(cmd.user_id, cmd.plan, now)))


def grant(ctx: Context, cmd: Grant, idem: IdempotencyRecord | None = None) -> View:
    amount = money(cmd.amount)
    if amount <= ZERO:
        raise InvalidRequest("amount must be greater than 0.00", field="amount")

    def work(uow: UnitOfWork, now: datetime) -> View:
        account = uow.billing.grant(cmd.user_id, amount, cmd.reason, now)
        return {**account_view(account), "grant": {"amount": fmt(amount), "reason": cmd.reason}}

    return idempotent(ctx, idem, 201, work)


def store_response(ctx: Context, cmd: StoreResponse,
                   idem: IdempotencyRecord | None = None) -> None:
    with ctx.uow_factory() as uow:
        uow.idempotency.put(cmd.record, cmd.status, cmd.body, ctx.clock())
        uow.commit()


# ------------------------------------------------------------------ results (n8n)
_RESULT_TRIGGERS = {
    "AIGenerationSamplesReady": "samples_ready",
    "AIGenerationFinalAssetReady": "final_ready",
    "AIGenerationFailed": "result_failed",
}


def apply_result(ctx: Context, cmd: ApplyResult,
                 idem: IdempotencyRecord | None = None) -> str:
    """Apply one result from n8n; return ``applied`` or the reason it was refused."""
    return ctx.retrying(lambda: _apply_result_once(ctx, cmd))


def _apply_result_once(ctx: Context, cmd: ApplyResult) -> str:
    now = ctx.clock()
    with ctx.uow_factory() as uow:
        saga = uow.generations.get(cmd.generation_id, for_update=True)
        if saga is None:
            return UNKNOWN_GENERATION
        unsafe = unsafe_result(cmd, allow_http=ctx.config.allow_http_assets)
        outcome = _apply_loaded(ctx, uow, saga, cmd, now, unsafe)
        uow.commit()
    ctx.observer.count("results", event_type=cmd.event_type, outcome=outcome)
    return outcome


def _apply_loaded(ctx: Context, uow: UnitOfWork, saga: Generation, cmd: ApplyResult,
                  now: datetime, unsafe: dict[str, str] | None,
                  fresh: bool | None = None) -> str:
    """Apply ``cmd`` to its locked saga in ``uow`` (not committed). ``fresh``: the inbox's
    answer when the caller already recorded the dedup key (a batch does that in one go)."""
    saga.pending.append(it.HistoryEntry(kind="message_in", actor="n8n",
                                        detail=_result_detail(cmd)))
    if unsafe is not None:
        saga.reject("n8n", UNSAFE_RESULT, event_type=cmd.event_type, job_id=cmd.job_id,
                    state=saga.state, **unsafe)
        apply_intents(ctx, uow, saga, saga.take_pending(), now)
        return UNSAFE_RESULT
    if cmd.event_type == "AIGenerationProgress":
        outcome = _progress(saga, cmd)
        apply_intents(ctx, uow, saga, saga.take_pending(), now)
        return outcome
    return _result(ctx, uow, saga, cmd, now, fresh)


def apply_results(ctx: Context, cmd: ApplyResults,
                  idem: IdempotencyRecord | None = None) -> list[str]:
    """Apply a batch of results in one unit of work: one outcome per result, in order.

    The sagas are locked in one statement, the dedup keys recorded in one, their rows
    written together at the commit; each result goes through exactly the steps
    :func:`apply_result` takes. Anything that raises rolls the whole batch back (the
    consumer then applies the results one by one, so a bad one stays on its own).
    """
    return ctx.retrying(lambda: _apply_results_once(ctx, cmd.results))


def _apply_results_once(ctx: Context, results: tuple[ApplyResult, ...]) -> list[str]:
    now = ctx.clock()
    outcomes = [UNKNOWN_GENERATION] * len(results)
    with ctx.uow_factory() as uow:
        sagas = uow.generations.get_many([r.generation_id for r in results], for_update=True)
        unsafe = [unsafe_result(r, allow_http=ctx.config.allow_http_assets) for r in results]
        deduplicated = [i for i, r in enumerate(results)
                        if r.generation_id in sagas and unsafe[i] is None
                        and r.event_type in _RESULT_TRIGGERS]
        new_keys = uow.inbox.add_many(
            [(results[i].job_id, results[i].event_type, results[i].generation_id)
             for i in deduplicated], now)
        # Credit moves take account rows in user order: two batches never wait crosswise.
        # The sort is stable, so one saga's results keep their order.
        known = sorted((i for i, r in enumerate(results) if r.generation_id in sagas),
                       key=lambda i: sagas[results[i].generation_id].user_id)
        for i in known:
            cmd = results[i]
            fresh: bool | None = None
            if cmd.event_type in _RESULT_TRIGGERS and unsafe[i] is None:
                fresh = (cmd.job_id, cmd.event_type) in new_keys
                new_keys.discard((cmd.job_id, cmd.event_type))  # a repeat in the batch: dup
            outcomes[i] = _apply_loaded(ctx, uow, sagas[cmd.generation_id], cmd, now,
                                        unsafe[i], fresh)
        uow.commit()
    for i in known:
        ctx.observer.count("results", event_type=results[i].event_type, outcome=outcomes[i])
    return outcomes


def _progress(saga: Generation, cmd: ApplyResult) -> str:
    # Progress changes nothing and is not deduplicated; only the current job's counts.
    if cmd.job_id != saga.job_id:
        saga.reject("n8n", "stale_job", event_type=cmd.event_type, job_id=cmd.job_id)
        return "stale_job"
    percent = max(0, min(100, int(cmd.percent or 0)))
    saga.pending.append(it.Notify("progress", f"Working on it: {percent}%",
                                  {"percent": percent, "stage": saga.stage}))
    return APPLIED


def _result_payload(cmd: ApplyResult, attempt: int) -> tg.Trigger:
    detail: dict[str, Any] = {"job_id": cmd.job_id, "attempt": attempt}
    if cmd.event_type == "AIGenerationSamplesReady":
        return tg.SamplesReady(samples=cmd.samples or [], detail=detail)
    if cmd.event_type == "AIGenerationFinalAssetReady":
        return tg.FinalReady(asset=cmd.asset or {}, detail=detail)
    return tg.ResultFailed(error=cmd.error or {}, detail={**detail, "error": cmd.error})


def _result(ctx: Context, uow: UnitOfWork, saga: Generation, cmd: ApplyResult,
            now: datetime, fresh: bool | None = None) -> str:
    trigger = _RESULT_TRIGGERS[cmd.event_type]
    reason: str | None = None
    if fresh is None:
        fresh = uow.inbox.add(cmd.job_id, cmd.event_type, saga.id, now)
    if not fresh:
        reason = "duplicate"
    elif trigger not in MACHINE.get_triggers(saga.state) or saga.state == "compensating":
        reason = "wrong_state"
    elif cmd.job_id != saga.job_id:
        reason = "stale_job"
    if reason is None:
        if transition(ctx, uow, saga, _result_payload(cmd, saga.attempt), "n8n", now):
            return APPLIED
        reason = "refused_by_guard"
    saga.reject("n8n", reason, event_type=cmd.event_type, job_id=cmd.job_id, state=saga.state)
    apply_intents(ctx, uow, saga, saga.take_pending(), now)
    return reason


def unsafe_result(cmd: ApplyResult, *, allow_http: bool) -> dict[str, str] | None:
    """The first field of a result that the web app must never render, or ``None``.

    The result policy (docs/input-rules.md): sample and asset URLs are ``s3://`` or
    ``https://`` (``http://`` with ``allow_http``), sample ids ``[A-Za-z0-9._-]{1,64}``, the
    asset's format one of png/jpeg/webp. An unsafe result is not applied; the returned
    ``field`` and ``problem`` go into its ``rejected`` history row (never the value itself).
    """
    checks: list[tuple[str, str | None]] = []
    for index, sample in enumerate(cmd.samples or []):
        checks.append((f"samples.{index}.sample_id", check_sample_id(sample.get("sample_id"))))
        checks.append((f"samples.{index}.url",
                       check_result_url(sample.get("url"), allow_http=allow_http)))
    if cmd.asset is not None:
        checks.append(("asset.url", check_result_url(cmd.asset.get("url"),
                                                     allow_http=allow_http)))
        checks.append(("asset.format", check_asset_format(cmd.asset.get("format", "png"))))
    for field_name, problem in checks:
        if problem is not None:
            return {"field": field_name, "problem": problem}
    return None


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


# ------------------------------------------------------------------ timers
def fire_deadlines(ctx: Context, cmd: FireDeadlines,
                   idem: IdempotencyRecord | None = None) -> int:
    """Fire every passed deadline (at most ``cmd.limit``); each in its own transaction."""
    fired = 0
    while fired < cmd.limit:
        if not ctx.retrying(lambda: _fire_one_due(ctx)):
            break
        fired += 1
    return fired


def _timer_payload(saga: Generation) -> tg.Trigger:
    if saga.due_kind == "retry":
        return tg.Redispatch()
    if saga.due_kind == "compensate":
        return tg.Compensated(error=(saga.compensation.error if saga.compensation else None)
                              or {})
    return tg.Timeout()


def _fire_one_due(ctx: Context) -> bool:
    """Fire the earliest passed deadline. A firing that raises never blocks the others: the
    saga's deadline moves by the retry policy's backoff (transient), or it is parked
    (permanent, or past the budget); only a failure to claim at all propagates."""
    now = ctx.clock()
    claimed: str | None = None
    kind = "timer"
    try:
        with ctx.uow_factory() as uow:
            try:
                saga = uow.generations.claim_due(now)
            except UnloadableSaga as exc:
                claimed = exc.generation_id
                raise
            if saga is None:
                return False
            claimed = saga.id
            due_kind = saga.due_kind
            kind = "compensation" if due_kind == "compensate" else "timer"
            # A child of the transition that armed the timer, linked to it: one trace per saga.
            with ctx.tracer.link_to(saga.due_traceparent, "timer fired",
                                    generation_id=saga.id, timer=due_kind):
                try:
                    fired = transition(ctx, uow, saga, _timer_payload(saga), "timer", now)
                except CommitInFlight as exc:  # before InvalidState: it is one
                    _await_sent_commit(ctx, uow, saga.id, kind, exc, now)
                    uow.commit()
                    return True
                except InvalidState:
                    fired = False
                if not fired:
                    # A timer the saga no longer accepts must not be claimed again and again.
                    saga.due_at = saga.due_kind = None
                    saga.note("timer", {"ignored_timer": due_kind, "state": saga.state})
                    apply_intents(ctx, uow, saga, saga.take_pending(), now)
                ctx.observer.count("deadlines", kind=str(due_kind))
                uow.commit()
                return True
    except ConcurrencyConflict:
        raise  # another writer moved the saga on: ctx.retrying fires it again
    except Exception as exc:
        if claimed is None:
            raise  # could not even claim (database down): the sweeper backs off
        _fire_failed(ctx, claimed, kind, exc, now)
        return True


def _await_sent_commit(ctx: Context, uow: UnitOfWork, generation_id: str, kind: str,
                       exc: CommitInFlight, now: datetime) -> None:
    """The deadline would release a hold whose commit was sent to billing (our transaction
    that settled it was lost): it yields to that result, which is redelivered, and fires
    again after the retry policy's backoff (without jitter, at least half a second). Once it
    has waited ``config.commit_wait`` in all, the saga is parked — its hold left open, never
    released (billing may have committed it).

    The wait is bounded by time rather than by the policy's attempts: the result may only
    come back once the service is up again and its consumer got to it, which a small attempt
    budget with a short cap (a few seconds) does not cover."""
    holds = ", ".join(exc.hold_ids)
    policy = ctx.retry.limited(jitter=0)

    def step(n: int) -> float:
        return max(policy.delay(n), 0.5)

    failures = uow.generations.fire_failed(
        generation_id, lambda n: now + timedelta(seconds=step(n)),
        note={"deadline_deferred": kind, "reason": "commit_sent_to_billing", "hold_id": holds},
        at=now)
    ctx.observer.count("deadlines_deferred", reason="commit_in_flight")
    waited = sum(step(n) for n in range(1, failures))
    if waited >= ctx.config.commit_wait.total_seconds():
        park(ctx, uow, generation_id, kind,
             f"a commit of hold {holds} was sent to billing and its result never came back "
             f"(deadline deferred {failures - 1} times, {waited:.0f} s); the hold is not "
             "released: find out from billing whether it was committed", now,
             cause="commit_in_flight")


__all__ = ["APPLIED", "UNKNOWN_GENERATION", "UNSAFE_RESULT", "idempotent", "unsafe_result"]


def _fire_failed(ctx: Context, generation_id: str, kind: str, exc: Exception,
                 now: datetime) -> None:
    cause = classify(exc)
    reason = f"{type(exc).__name__}: {exc}"[:500]
    ctx.observer.count("fire_failures", cause=cause)
    with ctx.uow_factory() as uow:
        if cause == "permanent":
            park(ctx, uow, generation_id, kind, reason, now, cause="permanent")
        else:
            failures = uow.generations.fire_failed(
                generation_id, lambda n: now + ctx.retry.delay_td(n))
            if not ctx.retry.allows(failures):
                park(ctx, uow, generation_id, kind,
                     f"retry budget exhausted after {failures} failures: {reason}", now,
                     cause="budget")
        uow.commit()
    FAILURE_LOG.failed(f"firing {kind} of a saga", f"{generation_id}: {reason}")
