"""Support staff's commands: cancel, resolve a stuck hold, retry a parked saga, and the
dead-letter store (keep, replay, discard a message the service could not use).

Split from :mod:`saga.handlers` (Odoo's, n8n's and the timers' commands) so each room stays
readable; both are routed by :data:`saga.messagebus.HANDLERS` and share its helpers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

from saga import intents as it
from saga import triggers as tg
from saga.commands import (
    DiscardDeadLetter,
    Park,
    ReplayDeadLetter,
    StoreDeadLetter,
    SupportCancel,
    SupportResolve,
    SupportRetry,
)
from saga.effects import Context, apply_intents, park, transition
from saga.errors import InvalidRequest, InvalidState, NotFound, UnloadableSaga
from saga.handlers import View, idempotent
from saga.machine import fire
from saga.messages import OutboundMessage
from saga.model import Generation, new_id
from saga.ports import DeadLetter, IdempotencyRecord, UnitOfWork
from saga.pricing import fmt
from saga.views import dead_letter_view, generation_view


# ------------------------------------------------------------------ support actions, dead letters
def support_cancel(ctx: Context, cmd: SupportCancel,
                   idem: IdempotencyRecord | None = None) -> View:
    """Cancel as support: the cancel trigger with actor ``support``; 409 when terminal."""

    def work(uow: UnitOfWork, now: datetime) -> View:
        saga = _support_saga(uow, cmd.generation_id)
        if saga.terminal:
            raise InvalidState(f"the generation is already {saga.state}", state=saga.state)
        if not transition(ctx, uow, saga, tg.Cancel(detail={"reason": cmd.reason}),
                          "support", now):
            raise InvalidState("cannot cancel while compensating towards "
                               f"{saga.compensation.target if saga.compensation else '?'}",
                               state=saga.state)
        return generation_view(saga)

    return idempotent(ctx, idem, 200, work)


def support_resolve(ctx: Context, cmd: SupportResolve,
                    idem: IdempotencyRecord | None = None) -> View:
    """Record how billing settled the stuck hold (no billing call), then finish compensating.

    The hold is closed in our mirror exactly as the outcome says; the saga then fires
    ``compensated`` as if billing had answered, and its ending finds no hold left to settle.
    """
    if cmd.outcome not in ("released", "committed"):
        raise InvalidRequest("outcome must be released or committed", field="outcome")
    commit = cmd.outcome == "committed"

    def work(uow: UnitOfWork, now: datetime) -> View:
        saga = _support_saga(uow, cmd.generation_id)
        comp = saga.compensation
        if saga.state != "compensating" or comp is None:
            raise InvalidState("only a generation stuck in compensating has a hold to resolve",
                               state=saga.state)
        hold = saga.hold
        if hold is None or hold.hold_id != cmd.hold_id:
            raise InvalidState(f"hold {cmd.hold_id} is not this generation's open hold",
                               state=saga.state)
        if not uow.billing.settle(hold.hold_id, commit=commit, at=now):
            raise InvalidState(f"hold {cmd.hold_id} is not open", state=saga.state)
        saga.held -= hold.amount
        if commit:
            saga.charged += hold.amount
        else:
            saga.released += hold.amount
        saga.hold = None
        saga.note("support", {"action": "resolve", "reason": cmd.reason,
                              "hold_id": hold.hold_id, "outcome": cmd.outcome})
        saga.pending.append(it.HistoryEntry(kind="credit", actor="support", detail={
            "op": "commit" if commit else "release", "hold_id": hold.hold_id,
            "amount": fmt(hold.amount), "stage": hold.stage, "resolved_by_support": True}))
        fired = fire(saga, tg.Compensated(error=comp.error or {}, detail={
            "reason": cmd.reason, "resolved_hold": hold.hold_id, "outcome": cmd.outcome}),
            now=now, actor="support", config=ctx.config)
        pending = saga.take_pending()
        # The hold is settled above: the ending must not ask billing again.
        assert fired and not any(isinstance(i, it.Commit | it.Release) for i in pending)
        apply_intents(ctx, uow, saga, pending, now)
        ctx.observer.count("credits", op="commit" if commit else "release")
        return generation_view(saga)

    return idempotent(ctx, idem, 200, work)


def _support_saga(uow: UnitOfWork, generation_id: str) -> Generation:
    saga = uow.generations.get(generation_id, for_update=True)
    if saga is None:
        raise NotFound(f"generation {generation_id} not found")
    return saga


def store_dead_letter(ctx: Context, cmd: StoreDeadLetter,
                      idem: IdempotencyRecord | None = None) -> bool:
    """Insert a dead letter (idempotent by ``message_key``); note it in its saga's history."""

    def attempt() -> bool:
        with ctx.uow_factory() as uow:
            letter = DeadLetter(new_id(), cmd.dead_lettered_at, cmd.reason[:1000],
                                cmd.exchange, cmd.routing_key, cmd.generation_id, cmd.body,
                                "open")
            if not uow.dead_letters.add(letter, cmd.message_key):
                return False
            saga = _saga_to_note(uow, cmd.generation_id)
            if saga is not None:
                saga.note("system", {"dead_lettered": letter.id,
                                     "reason": letter.reason[:200],
                                     "routing_key": letter.routing_key})
                apply_intents(ctx, uow, saga, saga.take_pending(), ctx.clock())
            uow.commit()
        ctx.observer.count("dead_letters_stored", reason=cmd.reason.split(":")[0][:40])
        return True

    return ctx.retrying(attempt)


def replay_dead_letter(ctx: Context, cmd: ReplayDeadLetter,
                       idem: IdempotencyRecord | None = None) -> View:
    """Publish the stored body again (through the outbox) to its exchange and routing key."""

    def work(uow: UnitOfWork, now: datetime) -> View:
        letter = _open_letter(uow, cmd.dead_letter_id)
        try:
            data = json.loads(letter.body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidState("the body is not UTF-8 JSON: a replay would only be "
                               "dead-lettered again; discard it instead",
                               state=letter.status) from None
        if "\x00" in letter.body.decode():
            raise InvalidState("the body contains NUL characters: a replay would only be "
                               "dead-lettered again; discard it instead", state=letter.status)
        _republish(uow, letter, now, data)
        uow.dead_letters.resolve(letter.id, "replayed", now, "support", cmd.reason)
        _note_letter(ctx, uow, letter, "replay_dead_letter", cmd.reason, now)
        return dead_letter_view(replace(letter, status="replayed", resolved_at=now,
                                        resolved_by="support", resolved_reason=cmd.reason))

    return idempotent(ctx, idem, 202, work)


def _republish(uow: UnitOfWork, letter: DeadLetter, now: datetime, data: Any = None) -> None:
    """Publish a stored body again, through the outbox, to its exchange and routing key."""
    if data is None:
        try:
            data = json.loads(letter.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
    event_type = data.get("event_type") if isinstance(data, dict) else None
    uow.outbox.add(OutboundMessage(
        letter.exchange, letter.routing_key, new_id(), letter.generation_id or "",
        event_type[:64] if isinstance(event_type, str) else "replay", {},
        payload=letter.body), now)


def discard_dead_letter(ctx: Context, cmd: DiscardDeadLetter,
                        idem: IdempotencyRecord | None = None) -> View:
    def work(uow: UnitOfWork, now: datetime) -> View:
        letter = _open_letter(uow, cmd.dead_letter_id)
        uow.dead_letters.resolve(letter.id, "discarded", now, "support", cmd.reason)
        _note_letter(ctx, uow, letter, "discard_dead_letter", cmd.reason, now)
        return dead_letter_view(replace(letter, status="discarded", resolved_at=now,
                                        resolved_by="support", resolved_reason=cmd.reason))

    return idempotent(ctx, idem, 200, work)


def _open_letter(uow: UnitOfWork, dead_letter_id: str) -> DeadLetter:
    letter = uow.dead_letters.get(dead_letter_id, for_update=True)
    if letter is None:
        raise NotFound(f"dead letter {dead_letter_id} not found")
    if letter.status != "open":
        raise InvalidState(f"the dead letter was already {letter.status}", state=letter.status)
    return letter


def _saga_to_note(uow: UnitOfWork, generation_id: str | None) -> Generation | None:
    """The saga a dead letter names, to note it in its history; None when unknown or when its
    row cannot be loaded (a poisoned saga is parked on its own: the letter is kept anyway)."""
    if not generation_id:
        return None
    try:
        return uow.generations.get(generation_id, for_update=True)
    except UnloadableSaga:
        return None


def _note_letter(ctx: Context, uow: UnitOfWork, letter: DeadLetter, action: str,
                 reason: str, now: datetime) -> None:
    saga = _saga_to_note(uow, letter.generation_id)
    if saga is None:
        return
    saga.note("support", {"action": action, "reason": reason, "dead_letter_id": letter.id,
                          "routing_key": letter.routing_key})
    apply_intents(ctx, uow, saga, saga.take_pending(), now)


# ------------------------------------------------------------------ parking (support)
def park_saga(ctx: Context, cmd: Park, idem: IdempotencyRecord | None = None) -> bool:
    """Park a saga in a fresh transaction (plain SQL by id); False if unknown or parked."""
    def attempt() -> bool:
        with ctx.uow_factory() as uow:
            parked = park(ctx, uow, cmd.generation_id, cmd.kind, cmd.reason, ctx.clock(),
                          cause=cmd.cause)
            uow.commit()
        return parked

    return ctx.retrying(attempt)


# Dead-letter reasons of a result that parsed but whose processing failed (messaging.consumer):
# the step a saga parked with kind ``result`` is waiting for. Any other reason (schema,
# not_json, too deep, ...) would only be dead-lettered again.
REPLAYABLE_RESULT_REASONS = ("processing_error:", "retry_budget_exhausted:")


def support_retry(ctx: Context, cmd: SupportRetry,
                  idem: IdempotencyRecord | None = None) -> View:
    """Clear ``attention`` and make the parked step run again now.

    A parked timer or compensation: its deadline is due now, the sweeper fires it. A parked
    result (kind ``result``): the step is the message, so every open dead letter of this
    generation that is a result whose processing failed is published again (through the
    outbox, as :func:`replay_dead_letter` does) and marked replayed by support with the
    retry's reason; the unpark note lists their ids (``replayed_dead_letters``, possibly
    empty). A result that fails again parks the saga again, with a new dead letter.
    """
    def work(uow: UnitOfWork, now: datetime) -> View:
        try:
            saga = uow.generations.get(cmd.generation_id, for_update=True)
        except Exception as exc:  # still a corrupt row: keep it parked until it is repaired
            raise InvalidState(f"the stored saga cannot be loaded ({type(exc).__name__}); "
                               "repair its row first") from exc
        if saga is None:
            raise NotFound(f"generation {cmd.generation_id} not found")
        if saga.attention is None:
            raise InvalidState("nothing is parked for this generation")
        letters: list[DeadLetter] = []
        note: dict[str, Any] | None = None
        if saga.attention.get("kind") == "result":
            letters = [letter for letter in uow.dead_letters.open_for_generation(saga.id)
                       if letter.routing_key.startswith("generation.result.")
                       and letter.reason.startswith(REPLAYABLE_RESULT_REASONS)]
            note = {"replayed_dead_letters": [letter.id for letter in letters]}
        uow.generations.unpark(saga.id, now, actor="support", reason=cmd.reason,
                               due_now=True, note=note)
        for letter in letters:
            _republish(uow, letter, now)
            uow.dead_letters.resolve(letter.id, "replayed", now, "support", cmd.reason)
        unparked = uow.generations.get(saga.id)
        assert unparked is not None
        return generation_view(unparked)

    return idempotent(ctx, idem, 200, work)
