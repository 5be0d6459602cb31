"""Value types the saga keeps: its open hold, a pending compensation, a user-facing error.

Frozen, compared by value, with ``to_json``/``from_json`` for the saga's JSON body (the
persisted form, and what the API and notifications show, stays the same plain object).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from saga.pricing import Stage


@dataclass(frozen=True)
class Hold:
    """The credits held for the stage in progress (committed or released exactly once)."""

    hold_id: str
    stage: Stage
    amount: Decimal

    def to_json(self) -> dict[str, Any]:
        return {"hold_id": self.hold_id, "stage": self.stage, "amount": str(self.amount)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hold:
        return cls(str(data["hold_id"]), cast(Stage, data["stage"]), Decimal(data["amount"]))


@dataclass(frozen=True)
class Compensation:
    """A release external billing did not take: where the saga lands once it goes through."""

    target: str  # the state the interrupted transition was headed for
    trigger: str  # the trigger that was interrupted
    error: dict[str, Any] | None = None  # n8n's error, for a failure that is being ended
    tries: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "trigger": self.trigger, "error": self.error,
                "tries": self.tries}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Compensation:
        return cls(str(data["target"]), str(data["trigger"]), data.get("error"),
                   int(data.get("tries", 1)))


@dataclass(frozen=True)
class SagaError:
    """What the user is told went wrong; ``message`` is always our own wording."""

    code: str
    message: str
    retryable: bool

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SagaError:
        return cls(str(data["code"]), str(data["message"]), bool(data.get("retryable")))
