"""Read-side queries: no trigger fires, nothing is written.

Kept apart from the command handlers (cosmicpython's ``views``): each query opens its own
unit of work and renders with :mod:`saga.views`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from saga.errors import GenerationUnreadable, NotFound, UnloadableSaga
from saga.ports import IdempotencyRecord, UnitOfWork
from saga.views import account_view, dead_letter_view, generation_view

Cursor = tuple[datetime, str]


class Queries:
    def __init__(self, uow_factory: Callable[[], UnitOfWork]) -> None:
        self.uow_factory = uow_factory

    def get(self, generation_id: str) -> dict[str, Any]:
        """The Generation resource; a stored row that no longer loads is
        :class:`GenerationUnreadable` (409 with its state and attention), never a crash."""
        with self.uow_factory() as uow:
            try:
                saga = uow.generations.get(generation_id)
            except UnloadableSaga as exc:
                raise GenerationUnreadable.of(exc) from exc
        if saga is None:
            raise NotFound(f"generation {generation_id} not found")
        return generation_view(saga)

    def list_generations(self, *, user_id: str | None, state: str | None, limit: int,
                         after: Cursor | None) -> tuple[list[dict[str, Any]], Cursor | None]:
        with self.uow_factory() as uow:
            sagas = uow.generations.search(user_id=user_id, state=state, limit=limit + 1,
                                           after=after)
        more = len(sagas) > limit
        sagas = sagas[:limit]
        cursor = (sagas[-1].created_at, sagas[-1].id) if more and sagas else None
        return [generation_view(s) for s in sagas], cursor

    def history(self, generation_id: str) -> dict[str, Any]:
        """The saga's history. Its events are rows of their own, so they stay readable when
        the saga's body does not load (then ``state`` is the row's state column)."""
        with self.uow_factory() as uow:
            try:
                saga = uow.generations.get(generation_id)
                state = saga.state if saga is not None else None
            except UnloadableSaga as exc:
                state = exc.state
            if state is None:
                raise NotFound(f"generation {generation_id} not found")
            events = uow.history.events(generation_id)
        return {"id": generation_id, "state": state, "events": events}

    def account(self, user_id: str) -> dict[str, Any]:
        with self.uow_factory() as uow:
            account = uow.billing.account(user_id)
        if account is None:
            raise NotFound(f"account {user_id} not found")
        return account_view(account)

    def attention(self, *, limit: int, after: Cursor | None
                  ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """Parked sagas, oldest first, and the cursor of the next page (None: last page)."""
        with self.uow_factory() as uow:
            rows = uow.generations.attention(limit + 1, after)
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = (rows[-1]["_since"], rows[-1]["generation_id"]) if more and rows else None
        return [{k: v for k, v in r.items() if k != "_since"} for r in rows], cursor

    def stored_response(self, idem: IdempotencyRecord) -> tuple[str, int, Any] | None:
        with self.uow_factory() as uow:
            return uow.idempotency.get(idem)


    # -- support: dead letters ---------------------------------------------------------------
    def dead_letters(self, *, limit: int, after: Cursor | None, status: str | None = "open"
                     ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """Dead letters newest first (``status`` None: all), with the next page's cursor."""
        with self.uow_factory() as uow:
            letters = uow.dead_letters.search(status=status, limit=limit + 1, after=after)
        more = len(letters) > limit
        letters = letters[:limit]
        cursor = ((letters[-1].dead_lettered_at, letters[-1].id) if more and letters
                  else None)
        return [dead_letter_view(x) for x in letters], cursor

    def dead_letter(self, dead_letter_id: str) -> dict[str, Any]:
        with self.uow_factory() as uow:
            letter = uow.dead_letters.get(dead_letter_id)
        if letter is None:
            raise NotFound(f"dead letter {dead_letter_id} not found")
        return dead_letter_view(letter)
