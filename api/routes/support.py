"""``/api/v1/generations/{id}/support/…``: support's actions on a saga (role support).

Each takes a ``reason`` (1 to 500 characters) recorded in the saga's history with actor
``support``, and an optional ``Idempotency-Key`` (same rules as every POST). An action that
does not apply to the saga's current situation is 409 ``invalid_state`` and changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import StringConstraints

from api.deps import Body, Deps, SupportRole, body_schema, command
from api.schemas import GenerationOut, Strict
from saga.commands import SupportCancel, SupportResolve

Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class SupportReasonBody(Strict):
    reason: Reason


class SupportResolveBody(Strict):
    reason: Reason
    hold_id: Annotated[str, StringConstraints(min_length=1, max_length=36)]
    outcome: Literal["released", "committed"]


router = APIRouter(prefix="/api/v1/generations", tags=["support"])


@router.post("/{generation_id}/support/cancel", response_model=GenerationOut,
             openapi_extra=body_schema(SupportReasonBody))
async def support_cancel(generation_id: str, request: Request, deps: Deps, role: SupportRole,
                         body: Annotated[SupportReasonBody, Body(SupportReasonBody)]
                         ) -> Response:
    """Cancel a generation that is not terminal; its open hold is released. 409 if terminal."""
    return await command(request, deps, role, body, 200,
                         SupportCancel(generation_id, body.reason))


@router.post("/{generation_id}/support/resolve", response_model=GenerationOut,
             openapi_extra=body_schema(SupportResolveBody))
async def support_resolve(generation_id: str, request: Request, deps: Deps, role: SupportRole,
                          body: Annotated[SupportResolveBody, Body(SupportResolveBody)]
                          ) -> Response:
    """Record how billing settled a hold it could not settle for us (checked by a person).

    Only for a saga stuck in ``compensating`` with that hold open; billing is not called. The
    saga then continues as if billing had answered.
    """
    return await command(request, deps, role, body, 200,
                         SupportResolve(generation_id, body.reason, body.hold_id, body.outcome))
