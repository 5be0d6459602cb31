"""Every change the console can ask for, in one place.

The console's POST handlers check the session and the CSRF token, validate the form, and call
these functions. Support actions (contract §7: recorded in the saga's history with actor
``support`` and the reason) need service commands that do not exist yet; until they do, each
function raises :class:`NotAvailableYet`, which the console shows as a 501 page. Wiring an
action later means changing only its function here.
"""

from __future__ import annotations

from typing import Any

from saga.commands import SupportRetry


class NotAvailableYet(Exception):
    """The service has no command for this action yet (shown as 501 Not Implemented)."""

    def __init__(self, action: str) -> None:
        super().__init__(f"{action} is not available in this version of the service yet")
        self.action = action


def cancel(deps: Any, generation_id: str, reason: str) -> dict[str, Any]:
    # The service's cancel command records actor ``odoo``; a support cancel must say
    # ``support`` in the history, so it waits for a support command.
    raise NotAvailableYet("Cancelling a generation from the console")


def retry(deps: Any, generation_id: str, reason: str) -> dict[str, Any]:
    """Clear a parked saga's attention and run its parked step now (history: actor
    ``support``, ``detail.reason``). NotFound / InvalidState (nothing parked) propagate."""
    result: dict[str, Any] = deps.bus.handle(SupportRetry(generation_id, reason))
    return result


def resolve(deps: Any, generation_id: str, reason: str, hold_id: str,
            outcome: str) -> dict[str, Any]:
    raise NotAvailableYet("Resolving a hold")


def replay_dead_letter(deps: Any, dead_letter_id: str, reason: str) -> None:
    raise NotAvailableYet("Replaying a dead letter")


def discard_dead_letter(deps: Any, dead_letter_id: str, reason: str) -> None:
    raise NotAvailableYet("Discarding a dead letter")
