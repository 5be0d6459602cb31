"""The generation state machine (docs/api.md), declared once and shared by every saga.

The ``Machine`` is built a single time with ``model=None`` and ``auto_transitions=False`` (the
automatic ``to_<state>()`` triggers would let callers skip guarded transitions). Instead of
decorating every loaded saga with per-instance trigger methods (``add_model``), :func:`fire`
hands the saga to the shared :class:`transitions.Event` directly: the library resolves state
and callbacks from the model passed in, so there is no shared model list to mutate and firing
is safe from many threads at once. The machine is a :class:`SagaMachine`: a plain ``Machine``
whose ``get_triggers`` of one state comes from a table instead of a scan of every event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from transitions import Machine

from saga.errors import InvalidState
from saga.intents import Actor
from saga.model import Generation, SagaConfig
from saga.triggers import Firing, Trigger

State = Literal[
    "requested",
    "processing_samples",
    "awaiting_selection",
    "processing_final",
    "compensating",
    "completed",
    "failed",
    "timed_out",
    "cancelled",
    "expired",
]
STATES: list[str] = list(get_args(State))

_CANCELLABLE = ["requested", "processing_samples", "awaiting_selection", "processing_final"]

# Order matters where one trigger has several rows: the first whose conditions pass wins.
TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start", "source": "requested", "dest": "processing_samples",
     "after": "begin_samples_round"},
    {"trigger": "samples_ready", "source": "processing_samples", "dest": "awaiting_selection",
     "after": "accept_samples"},
    {"trigger": "select", "source": "awaiting_selection", "dest": "processing_final",
     "conditions": "has_sample", "after": "begin_final"},
    {"trigger": "regenerate", "source": "awaiting_selection", "dest": "processing_samples",
     "after": "begin_samples_round"},
    {"trigger": "final_ready", "source": "processing_final", "dest": "completed",
     "after": "accept_final"},
    # A retryable failure with attempts left stays in the stage (internal: dest None) …
    {"trigger": "result_failed", "source": ["processing_samples", "processing_final"],
     "dest": None, "conditions": "may_retry", "after": "schedule_retry"},
    # … otherwise it ends the stage.
    {"trigger": "result_failed", "source": "processing_samples", "dest": "failed",
     "after": "end_samples_failed"},
    {"trigger": "result_failed", "source": "processing_final", "dest": "awaiting_selection",
     "after": "end_final_failed"},
    {"trigger": "redispatch", "source": ["processing_samples", "processing_final"],
     "dest": None, "conditions": "is_retry_due", "after": "dispatch_again"},
    # A passed deadline is never retried. A pending retry's due time is not a deadline.
    {"trigger": "timeout", "source": "processing_samples", "dest": "timed_out",
     "conditions": "is_timeout_due", "after": "end_samples_timed_out"},
    {"trigger": "timeout", "source": "processing_final", "dest": "awaiting_selection",
     "conditions": "is_timeout_due", "after": "end_final_timed_out"},
    {"trigger": "timeout", "source": "awaiting_selection", "dest": "expired",
     "conditions": "is_timeout_due", "after": "end_expired"},
    {"trigger": "cancel", "source": _CANCELLABLE, "dest": "cancelled", "after": "end_cancelled"},
    # Cancelling a saga whose release is stuck only changes where it lands afterwards.
    {"trigger": "cancel", "source": "compensating", "dest": None,
     "conditions": "can_cancel_compensation", "after": "retarget_to_cancelled"},
    # External billing did not answer a release: wait in `compensating` and retry.
    {"trigger": "billing_unavailable",
     "source": ["processing_samples", "processing_final", "awaiting_selection"],
     "dest": "compensating", "after": "begin_compensation"},
    *[
        {"trigger": "compensated", "source": "compensating", "dest": target,
         "conditions": "targets_compensation", "after": "finish_compensation"}
        for target in ("failed", "timed_out", "cancelled", "awaiting_selection")
    ],
]

class SagaMachine(Machine):
    """A :class:`transitions.Machine` that answers :meth:`get_triggers` of one state from a
    table instead of scanning every event's transitions on each call (~5 us; a result asks
    twice). The table is rebuilt whenever a transition is added or removed, so it always
    says what the scan would; firing itself is the library's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._triggers_from: dict[str, tuple[str, ...]] = {}
        super().__init__(*args, **kwargs)

    def add_transition(self, *args: Any, **kwargs: Any) -> None:
        self._triggers_from = {}
        super().add_transition(*args, **kwargs)
        self._triggers_from = {}

    def remove_transition(self, *args: Any, **kwargs: Any) -> None:
        self._triggers_from = {}
        super().remove_transition(*args, **kwargs)
        self._triggers_from = {}

    def triggers_from(self, state: str) -> tuple[str, ...]:
        """The triggers defined for ``state``, in the order :meth:`get_triggers` gives."""
        names = self._triggers_from.get(state)
        if names is None:
            names = tuple(super().get_triggers(state))
            if state in self.states:  # only the machine's own states: the table stays small
                self._triggers_from[state] = names
        return names

    def get_triggers(self, *args: Any) -> list[str]:
        if len(args) == 1 and isinstance(args[0], str):
            return list(self.triggers_from(args[0]))
        return list(super().get_triggers(*args))


MACHINE = SagaMachine(
    model=None,
    states=STATES,
    transitions=TRANSITIONS,
    initial=None,
    auto_transitions=False,
    send_event=True,
    before_state_change="record_transition",
    after_state_change="publish_state_change",
)

TRIGGERS = sorted({t["trigger"] for t in TRANSITIONS})


def allowed_triggers(state: str) -> list[str]:
    return list(MACHINE.triggers_from(state))


def fire(saga: Generation, payload: Trigger, *, now: datetime, actor: Actor,
         config: SagaConfig) -> bool:
    """Fire ``payload.name`` on ``saga``; raise :class:`InvalidState` if its state forbids it.

    Returns False when the trigger exists for the state but every guard refused it (nothing
    changed then). Guards that refuse with a reason of their own raise a ``DomainError``.
    """
    trigger = payload.name
    if trigger not in MACHINE.triggers_from(saga.state):
        raise InvalidState(f"cannot {trigger.replace('_', ' ')} a generation in state "
                           f"{saga.state!r}", state=saga.state)
    firing = Firing(payload, now, actor, config)
    result: bool = MACHINE.events[trigger].trigger(saga, firing=firing)
    return result
