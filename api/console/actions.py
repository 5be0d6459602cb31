"""Every change the console can ask for, in one place.

The console's POST handlers check the session and the CSRF token, validate the form, and call
these functions, which hand the service's support commands to its message bus (recorded in
the saga's history with actor ``support`` and the reason). An action whose command does not
exist yet raises :class:`NotAvailableYet`, which the console shows as a 501 page; wiring it
later means changing only its function here.
"""

from __future__ import annotations

from typing import Any

from saga.commands import (
    DiscardDeadLetter,
    ReplayDeadLetter,
    SupportCancel,
    SupportResolve,
    SupportRetry,
)


class NotAvailableYet(Exception):
    """The service has no command for this action yet (shown as 501 Not Implemented)."""

    def __init__(self, action: str) -> None:
        super().__init__(f"{action} is not available in this version of the service yet")
        self.action = action


def cancel(deps: Any, generation_id: str, reason: str) -> dict[str, Any]:
    result: dict[str, Any] = deps.bus.handle(SupportCancel(generation_id, reason))
    return result


def retry(deps: Any, generation_id: str, reason: str) -> dict[str, Any]:
    """Clear a parked saga's attention and run its parked step now (history: actor
    ``support``, ``detail.reason``). NotFound / InvalidState (nothing parked) propagate."""
    result: dict[str, Any] = deps.bus.handle(SupportRetry(generation_id, reason))
    return result


def resolve(deps: Any, generation_id: str, reason: str, hold_id: str,
            outcome: str) -> dict[str, Any]:
    result: dict[str, Any] = deps.bus.handle(
        SupportResolve(generation_id, reason, hold_id, outcome))
    return result


def replay_dead_letter(deps: Any, dead_letter_id: str, reason: str) -> None:
    deps.bus.handle(ReplayDeadLetter(dead_letter_id, reason))


def discard_dead_letter(deps: Any, dead_letter_id: str, reason: str) -> None:
    deps.bus.handle(DiscardDeadLetter(dead_letter_id, reason))
