"""``/api/v1/accounts``: plans, grants and balances (docs/api.md, credits)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import AccountId, AnyRole, Body, Deps, ServiceRole, body_schema, command, query
from api.schemas import AccountOut, GrantBody, GrantOut, SetPlanBody
from saga.commands import Grant, SetPlan

router = APIRouter(prefix="/api/v1/accounts", tags=["accounts"])


@router.get("/{user_id}", response_model=AccountOut)
async def get_account(role: AnyRole, user_id: AccountId, deps: Deps) -> Any:
    """Balance, open holds and what is available."""
    return await query(deps.queries.account, user_id)


@router.put("/{user_id}", response_model=AccountOut, openapi_extra=body_schema(SetPlanBody))
async def set_plan(role: ServiceRole, user_id: AccountId, request: Request, deps: Deps,
                   body: Annotated[SetPlanBody, Body(SetPlanBody)]) -> Response:
    """Set the plan; creates the account with balance 0 if new."""
    return await command(request, deps, role, body, 200, SetPlan(user_id, body.plan))


@router.post("/{user_id}/grants", status_code=201, response_model=GrantOut,
             openapi_extra=body_schema(GrantBody))
async def grant(role: ServiceRole, user_id: AccountId, request: Request, deps: Deps,
                body: Annotated[GrantBody, Body(GrantBody)]) -> Response:
    """Add credits; a new account starts on the free plan."""
    cmd = Grant(user_id, body.decimal(), body.reason)
    return await command(request, deps, role, body, 201, cmd)
