"""Parked sagas for support: ``GET /api/v1/attention`` and ``POST …/support/retry``.

A saga is parked when a timer, a compensation or a result failed in a way retrying will not
fix, or kept failing past the retry budget (see docs/architecture.md, "Retries and parking").
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from api.deps import Body, Cursor, Deps, SupportRole, body_schema, command, query
from api.routes.generations import _cursor, encode_cursor
from api.schemas import AttentionPage, GenerationOut, SupportRetryBody
from saga.commands import SupportRetry

router = APIRouter(prefix="/api/v1", tags=["attention"])


@router.get("/attention", response_model=AttentionPage)
async def attention(deps: Deps, role: SupportRole,
                    after: Annotated[Cursor | None, Depends(_cursor)],
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Any:
    """Parked sagas, oldest first, with an opaque cursor."""
    items, next_after = await query(deps.queries.attention, limit=limit, after=after)
    return {"items": items, "next_cursor": encode_cursor(next_after) if next_after else None}


@router.post("/generations/{generation_id}/support/retry", response_model=GenerationOut,
             openapi_extra=body_schema(SupportRetryBody))
async def support_retry(generation_id: str, request: Request, deps: Deps, role: SupportRole,
                        body: Annotated[SupportRetryBody, Body(SupportRetryBody)]) -> Response:
    """Clear the saga's ``attention`` and run its parked step again now (409 when nothing
    is parked)."""
    return await command(request, deps, role, body, 200,
                         SupportRetry(generation_id, body.reason))
