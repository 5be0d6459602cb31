"""One frozen payload type per state-machine trigger.

The handlers build a payload, :func:`saga.machine.fire` hands it to the machine wrapped in a
:class:`Firing` (with the time, the actor and the configuration), and every callback reads
typed fields from it instead of an untyped keyword bag. ``detail`` is what the transition's
history row records beside the state change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from saga.intents import Actor
from saga.pricing import Resolution

if TYPE_CHECKING:
    from saga.model import SagaConfig

@dataclass(frozen=True, kw_only=True)
class Trigger:
    """Base of every payload; ``name`` is the trigger in :data:`saga.machine.TRANSITIONS`."""

    name: ClassVar[str]
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Start(Trigger):
    name: ClassVar[str] = "start"
    price: Decimal


@dataclass(frozen=True, kw_only=True)
class Regenerate(Trigger):
    name: ClassVar[str] = "regenerate"
    price: Decimal
    prompt: str | None = None


@dataclass(frozen=True, kw_only=True)
class Select(Trigger):
    name: ClassVar[str] = "select"
    sample_id: str
    resolution: Resolution = "standard"
    price: Decimal


@dataclass(frozen=True, kw_only=True)
class SamplesReady(Trigger):
    name: ClassVar[str] = "samples_ready"
    samples: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class FinalReady(Trigger):
    name: ClassVar[str] = "final_ready"
    asset: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ResultFailed(Trigger):
    name: ClassVar[str] = "result_failed"
    error: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Redispatch(Trigger):
    name: ClassVar[str] = "redispatch"


@dataclass(frozen=True, kw_only=True)
class Timeout(Trigger):
    name: ClassVar[str] = "timeout"


@dataclass(frozen=True, kw_only=True)
class Cancel(Trigger):
    name: ClassVar[str] = "cancel"


@dataclass(frozen=True, kw_only=True)
class BillingUnavailable(Trigger):
    """A release could not reach external billing: wait in ``compensating``."""

    name: ClassVar[str] = "billing_unavailable"
    target: str
    original_trigger: str
    error: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Compensated(Trigger):
    """The stuck release went through: finish where the saga was headed."""

    name: ClassVar[str] = "compensated"
    error: dict[str, Any] | None = None


ALL: tuple[type[Trigger], ...] = (Start, Regenerate, Select, SamplesReady, FinalReady,
                                  ResultFailed, Redispatch, Timeout, Cancel, BillingUnavailable,
                                  Compensated)
BY_NAME: dict[str, type[Trigger]] = {t.name: t for t in ALL}

P = TypeVar("P", bound=Trigger)


@dataclass(frozen=True)
class Firing:
    """Everything a callback may read: the payload and when, by whom, under which config."""

    payload: Trigger
    now: datetime
    actor: Actor
    config: SagaConfig

    def expect(self, kind: type[P]) -> P:
        """The payload as ``kind``; a mismatch is a wiring bug, not bad input."""
        if not isinstance(self.payload, kind):
            raise TypeError(f"{self.payload.name} fired with a {type(self.payload).__name__}, "
                            f"expected {kind.__name__}")
        return self.payload
