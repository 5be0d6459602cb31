"""What a transition asks the outside world to do, recorded in order on the saga.

Transition callbacks never perform I/O (transitions does not roll back a state change when a
later callback raises); they append these records, and the unit of work makes them durable in
one database transaction: credit steps, outbox messages and history rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

Actor = Literal["odoo", "n8n", "timer", "support", "system"]
HistoryKind = Literal["transition", "credit", "message_in", "message_out", "rejected", "note"]


@dataclass(frozen=True)
class HistoryEntry:
    """A history row that needs no side effect (a transition, a note, a refusal)."""

    kind: HistoryKind
    actor: Actor
    trigger: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    trace_id: str | None = None  # the trace it was written in (None with tracing off)


@dataclass(frozen=True)
class Reserve:
    hold_id: str
    stage: str
    amount: Decimal


@dataclass(frozen=True)
class Commit:
    hold_id: str
    stage: str
    amount: Decimal


@dataclass(frozen=True)
class Release:
    hold_id: str
    stage: str
    amount: Decimal


@dataclass(frozen=True)
class Waive:
    """A stage that costs nothing on the user's plan: no hold, history op ``waived``."""

    stage: str


@dataclass(frozen=True)
class DispatchJob:
    stage: str
    job_id: str
    attempt: int


@dataclass(frozen=True)
class Notify:
    type: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishStateChanged:
    from_state: str
    to_state: str


Intent = (HistoryEntry | Reserve | Commit | Release | Waive | DispatchJob | Notify
          | PublishStateChanged)
