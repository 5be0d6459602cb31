"""Commands: what an HTTP call or a broker message asks the saga to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from saga.ports import IdempotencyRecord


@dataclass(frozen=True)
class StartGeneration:
    user_id: str
    prompt: str
    format: dict[str, Any]
    negative_prompt: str | None = None
    style: dict[str, Any] = field(default_factory=dict)
    brand: dict[str, Any] = field(default_factory=dict)
    input_assets: list[str] = field(default_factory=list)
    sample_count: int = 4
    project_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SelectSample:
    generation_id: str
    sample_id: str
    resolution: str = "standard"


@dataclass(frozen=True)
class Regenerate:
    generation_id: str
    prompt: str | None = None


@dataclass(frozen=True)
class Cancel:
    generation_id: str
    reason: str | None = None


@dataclass(frozen=True)
class ApplyResult:
    """A well-formed result from n8n (schema already checked by the consumer)."""

    event_type: str
    generation_id: str
    job_id: str
    samples: list[dict[str, Any]] | None = None
    asset: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    percent: int | None = None
    event_id: str | None = None
    model: str | None = None
    duration_ms: int | None = None


@dataclass(frozen=True)
class ApplyResults:
    """Results applied together in one transaction (the result consumer's group commit).

    All of them commit or none does; a batch that raises is applied again one
    :class:`ApplyResult` at a time by the consumer, so one bad result stays on its own.
    """

    results: tuple[ApplyResult, ...]


@dataclass(frozen=True)
class SetPlan:
    user_id: str
    plan: str


@dataclass(frozen=True)
class Grant:
    user_id: str
    amount: Decimal
    reason: str


@dataclass(frozen=True)
class FireDeadlines:
    """Fire every passed deadline, at most ``limit``, each in its own transaction."""

    limit: int = 200


@dataclass(frozen=True)
class StoreResponse:
    """Store a refusal's response under its Idempotency-Key (successes store their own)."""

    record: IdempotencyRecord
    status: int
    body: Any


# ------------------------------------------------------------------ support actions, dead letters
@dataclass(frozen=True)
class SupportCancel:
    """Support cancels a generation that is not terminal (history actor ``support``)."""

    generation_id: str
    reason: str


@dataclass(frozen=True)
class SupportResolve:
    """Support records how billing settled a hold it could not settle for us."""

    generation_id: str
    reason: str
    hold_id: str
    outcome: str  # "released" | "committed"


@dataclass(frozen=True)
class StoreDeadLetter:
    """Keep a dead-lettered (or unroutable) message in the service's own store."""

    message_key: str  # idempotency: the same delivery stored twice is one row
    dead_lettered_at: datetime
    reason: str
    exchange: str
    routing_key: str
    body: bytes
    generation_id: str | None = None


@dataclass(frozen=True)
class ReplayDeadLetter:
    dead_letter_id: str
    reason: str


@dataclass(frozen=True)
class DiscardDeadLetter:
    dead_letter_id: str
    reason: str


# ------------------------------------------------------------------ parking (support)
@dataclass(frozen=True)
class Park:
    """Park a saga for support (by id; works when its row cannot be loaded)."""

    generation_id: str
    kind: str  # timer | compensation | result
    reason: str
    cause: str = "permanent"  # metric label: permanent | budget


@dataclass(frozen=True)
class SupportRetry:
    """Support: clear a parked saga's ``attention`` and run the parked step again now."""

    generation_id: str
    reason: str
