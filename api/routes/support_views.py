"""Read-only views of the state machine: its definition and a saga drawn on it (docs/api.md).

``GET /api/v1/state-machine`` [service, support] returns the states and transitions read off
the machine every saga runs on; ``GET /api/v1/generations/{id}/diagram`` [support] draws that
machine as SVG with the saga's current state and the path its history took marked.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from api.console import data
from api.deps import AnyRole, SupportRole
from api.problems import Problem
from api.threads import blocking
from saga.diagram import definition, render_svg, taken_from_history
from saga.errors import NotFound


class _Svg(Response):
    media_type = "image/svg+xml"


def support_views_router(deps: Any) -> APIRouter:
    """``deps`` is the app's ``ApiDeps`` (``bus``, ``queries``, ``api_keys``)."""
    router = APIRouter(prefix="/api/v1", tags=["support"])
    machine = definition()
    machine_json = machine.as_json()

    @router.get("/state-machine", responses={200: {"content": {"application/json": {
        "schema": {"type": "object", "required": ["states", "transitions"],
                   "additionalProperties": True}}}}})
    async def state_machine(role: AnyRole) -> Any:
        """The states and transitions of the machine the service runs (``dest`` null: an
        internal transition, the saga stays in its state)."""
        return machine_json

    @router.get("/generations/{generation_id}/diagram", response_class=_Svg,
                responses={200: {"content": {"image/svg+xml": {"schema": {"type": "string"}}},
                                 "description": "The state machine as SVG"}})
    async def diagram(generation_id: str, role: SupportRole) -> Response:
        """The machine as SVG; the saga's current state has ``aria-current="step"`` and the
        states and transitions its history went through have the class ``taken``."""
        try:
            history = await blocking(data.history, deps.queries, generation_id)
        except NotFound as exc:
            raise Problem(404, "not_found", exc.message) from None
        svg = render_svg(machine, current=history["state"],
                         taken=taken_from_history(history["events"]),
                         title=f"Generation {generation_id}: {history['state']}")
        return Response(svg, media_type="image/svg+xml",
                        headers={"Cache-Control": "no-store"})

    return router
