"""``/api/v1/generations``: start and steer a generation (Odoo), read and list it (support)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from api.asset_links import presigned
from api.deps import (
    AnyRole,
    Body,
    Cursor,
    Deps,
    GenerationId,
    ServiceRole,
    SupportRole,
    body_schema,
    command,
    query,
)
from api.problems import validation_problem
from api.schemas import (
    CancelBody,
    GenerationOut,
    GenerationPage,
    HistoryOut,
    RegenerateBody,
    SelectionBody,
    StartGenerationBody,
    State,
)
from saga.commands import Cancel, Regenerate, SelectSample, StartGeneration
from saga.input_policy import check_user_id

router = APIRouter(prefix="/api/v1/generations", tags=["generations"])


@router.post("", status_code=202, response_model=GenerationOut,
             openapi_extra=body_schema(StartGenerationBody))
async def start_generation(
        request: Request, deps: Deps, role: ServiceRole,
        body: Annotated[StartGenerationBody, Body(StartGenerationBody)]) -> Response:
    """Start a generation: hold the sample round's credits and dispatch the samples job."""
    cmd = StartGeneration(
        user_id=body.user_id, prompt=body.prompt, format=body.format_spec(),
        negative_prompt=body.negative_prompt, style=body.style.model_dump(),
        brand=body.brand.model_dump(), input_assets=body.input_assets,
        sample_count=body.sample_count, project_id=body.project_id, metadata=body.metadata)
    return await command(request, deps, role, body, 202, cmd, key_required=True)


@router.get("/{generation_id}", response_model=GenerationOut)
async def get_generation(role: AnyRole, generation_id: GenerationId, deps: Deps) -> Any:
    """Read one generation."""
    view = await query(deps.queries.get, generation_id)
    return (await presigned([view], deps.asset_links))[0]


@router.post("/{generation_id}/selection", status_code=202, response_model=GenerationOut,
             openapi_extra=body_schema(SelectionBody))
async def select_sample(role: ServiceRole, generation_id: GenerationId, request: Request,
                        deps: Deps, body: Annotated[SelectionBody, Body(SelectionBody)]
                        ) -> Response:
    """Choose a delivered sample; holds the final's credits and dispatches the final job."""
    cmd = SelectSample(generation_id, body.sample_id, body.resolution)
    return await command(request, deps, role, body, 202, cmd)


@router.post("/{generation_id}/regenerate", status_code=202, response_model=GenerationOut,
             openapi_extra=body_schema(RegenerateBody))
async def regenerate(
        role: ServiceRole, generation_id: GenerationId, request: Request, deps: Deps,
        body: Annotated[RegenerateBody, Body(RegenerateBody, optional=True)]) -> Response:
    """Start a new sample round (its own hold) from ``awaiting_selection``."""
    return await command(request, deps, role, body, 202, Regenerate(generation_id, body.prompt))


@router.post("/{generation_id}/cancel", response_model=GenerationOut,
             openapi_extra=body_schema(CancelBody))
async def cancel(role: ServiceRole, generation_id: GenerationId, request: Request, deps: Deps,
                 body: Annotated[CancelBody, Body(CancelBody, optional=True)]) -> Response:
    """Cancel a generation that is not terminal; releases any open hold."""
    return await command(request, deps, role, body, 200, Cancel(generation_id, body.reason))


async def _cursor(cursor: str | None = None) -> Cursor | None:
    """The opaque ``cursor`` query parameter, decoded; 422 if this API did not make it."""
    if cursor is None:
        return None
    try:
        return decode_cursor(cursor)
    except ValueError:
        raise validation_problem([{"field": "cursor",
                                   "message": "is not a cursor from this API"}]) from None


@router.get("", response_model=GenerationPage)
async def list_generations(
        deps: Deps, role: SupportRole,
        after: Annotated[Cursor | None, Depends(_cursor)],
        user_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        state: State | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Any:
    """List generations, newest first, with an opaque cursor."""
    reason = None if user_id is None else check_user_id(user_id)
    if reason is not None:
        raise validation_problem([{"field": "user_id", "message": reason}])
    items, next_after = await query(deps.queries.list_generations, user_id=user_id,
                                    state=state, limit=limit, after=after)
    items = await presigned(items, deps.asset_links)
    return {"items": items, "next_cursor": encode_cursor(next_after) if next_after else None}


@router.get("/{generation_id}/history", response_model=HistoryOut)
async def history(role: SupportRole, generation_id: GenerationId, deps: Deps) -> Any:
    """The saga's full history: transitions, credit steps, messages in and out, refusals."""
    return await query(deps.queries.history, generation_id)


def hot_routes() -> list[APIRoute]:
    """The two calls of every generation, answered by :class:`api.direct.DirectRoutes`."""
    hot = (start_generation, select_sample)
    return [r for r in router.routes if isinstance(r, APIRoute) and r.endpoint in hot]


def encode_cursor(after: Cursor) -> str:
    raw = json.dumps([after[0].isoformat(), after[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, last_id = json.loads(raw)
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None or not isinstance(last_id, str):
            raise ValueError
        # Normalise here: a valid timestamp whose offset pushes it past year 1 or 9999 in UTC
        # (OverflowError) is a malformed cursor, not a failure deep in the query.
        return parsed.astimezone(UTC), last_id
    except Exception as exc:  # any malformed cursor is the caller's mistake
        raise ValueError("bad cursor") from exc
