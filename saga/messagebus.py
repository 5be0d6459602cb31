"""The message bus: one table from command type to its handler.

The API, the result consumer and the sweeper all hand commands to :meth:`MessageBus.handle`;
none of them knows which function runs. A new command is a dataclass in
:mod:`saga.commands`, a function in :mod:`saga.handlers` and one row in :data:`HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from saga import commands as c
from saga import handlers, support
from saga.effects import Context, utcnow
from saga.model import SagaConfig
from saga.observer import Observer
from saga.ports import IdempotencyRecord, UnitOfWork
from saga.retry import RetryPolicy
from saga.tracing import Tracer

Handler = Callable[[Context, Any, IdempotencyRecord | None], Any]

HANDLERS: dict[type[Any], Handler] = {
    c.StartGeneration: handlers.start_generation,
    c.SelectSample: handlers.select_sample,
    c.Regenerate: handlers.regenerate,
    c.Cancel: handlers.cancel,
    c.SetPlan: handlers.set_plan,
    c.Grant: handlers.grant,
    c.ApplyResult: handlers.apply_result,
    c.ApplyResults: handlers.apply_results,
    c.FireDeadlines: handlers.fire_deadlines,
    c.StoreResponse: handlers.store_response,
    # support actions, dead letters
    c.SupportCancel: support.support_cancel,
    c.SupportResolve: support.support_resolve,
    c.StoreDeadLetter: support.store_dead_letter,
    c.ReplayDeadLetter: support.replay_dead_letter,
    c.DiscardDeadLetter: support.discard_dead_letter,
    c.Park: support.park_saga,
    c.SupportRetry: support.support_retry,
}


class MessageBus:
    """Routes a command to its handler with the shared :class:`~saga.effects.Context`."""

    def __init__(self, uow_factory: Callable[[], UnitOfWork], config: SagaConfig,
                 clock: Callable[[], datetime] = utcnow, observer: Observer | None = None,
                 retry: RetryPolicy | None = None,
                 tracer: Tracer | None = None) -> None:
        self.ctx = Context(uow_factory, config, clock)
        if retry is not None:
            self.ctx.retry = retry
        if observer is not None:
            self.ctx.observer = observer
        if tracer is not None:
            self.ctx.tracer = tracer

    def handle(self, cmd: object, idem: IdempotencyRecord | None = None) -> Any:
        """Run ``cmd``'s handler; ``idem`` makes an Odoo command replayable by its key."""
        try:
            handler = HANDLERS[type(cmd)]
        except KeyError:
            raise TypeError(f"no handler for {type(cmd).__name__}") from None
        return handler(self.ctx, cmd, idem)
