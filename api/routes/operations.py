"""Probes and metrics for the platform: no authentication, no business data."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.deps import Deps
from api.schemas import Live, Ready

router = APIRouter(tags=["operations"])


@router.get("/health/live", response_model=Live)
async def live() -> Any:
    """The process is up."""
    return {"status": "ok"}


@router.get("/health/ready", response_model=Ready)
async def ready(deps: Deps) -> Response:
    """503 while the database or the broker is unreachable."""
    checks = {}
    for name, check in deps.readiness.items():
        try:
            checks[name] = bool(await run_in_threadpool(check))
        except Exception:
            checks[name] = False
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.registry),
                    media_type=CONTENT_TYPE_LATEST)
