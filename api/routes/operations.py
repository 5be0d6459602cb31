"""Probes and metrics for the platform: no authentication, no business data."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Deps
from api.problems import Problem
from api.schemas import Live, Ready
from api.threads import blocking

router = APIRouter(tags=["operations"])


@router.get("/health/live", response_model=Live)
async def live() -> Any:
    """The process is up."""
    return {"status": "ok"}


@router.get("/health/ready", response_model=Ready, responses={
    503: {"model": Ready, "description": "The database or the broker is unreachable"}})
async def ready(deps: Deps) -> Response:
    """503 while the database or the broker is unreachable."""
    checks = {}
    for name, check in deps.readiness.items():
        try:
            checks[name] = bool(await blocking(check))
        except Exception:
            checks[name] = False
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "Prometheus text exposition format 0.0.4"},
    401: {"description": "AIGEN_METRICS_TOKEN is set and the bearer token is missing or "
                         "wrong"}})
async def metrics(request: Request, deps: Deps) -> Response:
    """Prometheus text format. Public unless ``AIGEN_METRICS_TOKEN`` is set; then it needs
    ``Authorization: Bearer <token>``."""
    if deps.metrics_token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), deps.metrics_token.encode()):
            raise Problem(401, "unauthorized", "/metrics needs the metrics token "
                          "(Authorization: Bearer <AIGEN_METRICS_TOKEN>)")
    return Response(generate_latest(request.app.state.registry),
                    media_type=CONTENT_TYPE_LATEST)
