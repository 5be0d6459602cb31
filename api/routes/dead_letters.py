"""``/api/v1/dead-letters``: messages the service could not use, kept in its own store.

Dead-lettered results and unroutable outbound messages are moved from RabbitMQ into the
``dead_letters`` table (:mod:`aigen.jobs.dead_letters`); support lists them here and replays
(re-published through the outbox to the original exchange and routing key) or discards them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Protocol, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from api.deps import Body, Cursor, Deps, SupportRole, body_schema, command, query
from api.routes.generations import _cursor, encode_cursor
from api.routes.support import SupportReasonBody
from saga.commands import DiscardDeadLetter, ReplayDeadLetter

router = APIRouter(prefix="/api/v1/dead-letters", tags=["support"])


class DeadLetterReads(Protocol):
    def dead_letters(self, *, limit: int, after: Cursor | None, status: str | None = "open"
                     ) -> tuple[list[dict[str, Any]], Cursor | None]: ...


class DeadLetterOut(BaseModel):
    id: str
    dead_lettered_at: datetime
    reason: str
    exchange: str
    routing_key: str
    generation_id: str | None
    body_preview: str
    status: Literal["open", "replayed", "discarded"]
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolved_reason: str | None = None


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    next_cursor: str | None


@router.get("", response_model=DeadLetterPage)
async def list_dead_letters(
        deps: Deps, role: SupportRole,
        after: Annotated[Cursor | None, Depends(_cursor)],
        status: Literal["open", "replayed", "discarded", "all"] = "open",
        limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Any:
    """Dead letters, newest first (``status`` open by default), with an opaque cursor."""
    reads = cast(DeadLetterReads, deps.queries)
    items, next_after = await query(reads.dead_letters, limit=limit, after=after,
                                    status=None if status == "all" else status)
    return {"items": items, "next_cursor": encode_cursor(next_after) if next_after else None}


@router.post("/{dead_letter_id}/replay", status_code=202, response_model=DeadLetterOut,
             openapi_extra=body_schema(SupportReasonBody))
async def replay(dead_letter_id: str, request: Request, deps: Deps, role: SupportRole,
                 body: Annotated[SupportReasonBody, Body(SupportReasonBody)]) -> Response:
    """Publish the message again to its original exchange and routing key (via the outbox)."""
    return await command(request, deps, role, body, 202,
                         ReplayDeadLetter(dead_letter_id, body.reason))


@router.post("/{dead_letter_id}/discard", response_model=DeadLetterOut,
             openapi_extra=body_schema(SupportReasonBody))
async def discard(dead_letter_id: str, request: Request, deps: Deps, role: SupportRole,
                  body: Annotated[SupportReasonBody, Body(SupportReasonBody)]) -> Response:
    """Mark the message discarded: it stays in the store, on the record, and is not sent."""
    return await command(request, deps, role, body, 200,
                         DiscardDeadLetter(dead_letter_id, body.reason))
