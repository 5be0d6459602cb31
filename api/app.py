"""The FastAPI application: error rendering, the edge middleware and the routers.

Routes (``api/routes/``) authenticate, validate, build a command and hand it to the shared
:class:`saga.messagebus.MessageBus` (reads go to :class:`saga.queries.Queries`); they hold no
business rules. What they depend on is in :mod:`api.deps`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote_plus

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Histogram
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.console import console_router
from api.deps import MAX_BODY_BYTES, ApiDeps
from api.direct import DirectRoutes
from api.docs import install_docs
from api.problems import Problem, problem_response, validation_problem
from api.routes import accounts, attention, generations, operations
from api.routes import dead_letters as dead_letters_routes
from api.routes import support as support_routes
from api.routes.support_views import support_views_router
from api.threads import install_worker_pool
from saga.errors import BillingRefused, BillingUnavailable
from saga.input_policy import check_request_head

log = logging.getLogger(__name__)

__all__ = ["MAX_BODY_BYTES", "ApiDeps", "create_app"]


# FastAPI's own (native) telemetry off: HTTP spans come from the maintained OpenTelemetry
# instrumentation when tracing is configured (aigen/telemetry.py, docs/tracing.md), metrics
# are Prometheus. Left on, it looks the providers up in os.environ on every request (2.5 % of
# the service's CPU under load in the bench's profile) and would add a second set of spans.
# Older FastAPI versions have no such parameter.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


def create_app(deps: ApiDeps, *, direct_routes: bool = True) -> FastAPI:
    """The application; ``direct_routes=False`` sends every request through FastAPI's router
    (the tests compare both paths, :mod:`api.direct`)."""
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Handlers block on the database; more threads than connections only adds GIL churn.
        # Routes hand off through api.threads (the loop's default executor); AnyIO's pool is
        # left to Starlette's own few uses (static files), bounded the same.
        to_thread.current_default_thread_limiter().total_tokens = deps.worker_threads
        install_worker_pool(deps.worker_threads)
        yield

    app = FastAPI(title="aigen-orchestrator", version="0.1.0", lifespan=lifespan,
                  description="CreativeFlow AI generation saga coordinator",
                  **_NO_TELEMETRY)
    registry = deps.registry or CollectorRegistry()
    app.state.deps = deps
    app.state.registry = registry
    app.state.api_keys = [(k.encode(), role) for k, role in deps.api_keys.items()]
    latency = Histogram("aigen_http_request_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
    if direct_routes:  # added first: the innermost middleware, inside the edge's timing
        app.add_middleware(DirectRoutes, fastapi_app=app, routes=generations.hot_routes())
    app.add_middleware(_EdgeMiddleware, latency=latency)
    _add_error_handlers(app)
    for router in (generations.router, accounts.router, operations.router):
        app.include_router(router)
    app.include_router(support_routes.router)
    app.include_router(dead_letters_routes.router)
    app.include_router(support_views_router(deps))
    app.include_router(attention.router)
    app.include_router(console_router(deps))
    if deps.assets_dir is not None:
        deps.assets_dir.mkdir(parents=True, exist_ok=True)
        app.mount("/assets", StaticFiles(directory=deps.assets_dir), name="assets")
    install_docs(app, public=deps.public_docs)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal is an RFC 9457 problem with a ``code``; nothing leaks a bare 500."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return problem_response(exc.status, exc.body(request.url.path), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p not in ("query", "path")),
                   "message": e["msg"]} for e in exc.errors()]
        return problem_response(422, validation_problem(errors).body(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Allow lists every method of the path (RFC 9110 §15.5.6),
            headers["Allow"] = _allowed_methods(request)  # not just the first route's
        return problem_response(exc.status_code,
                                Problem(exc.status_code, code, str(exc.detail)).body(
                                    request.url.path), headers or None)

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> Response:
        return problem_response(503, Problem(503, "service_unavailable",
                                             "the database is unavailable, retry later").body(
                                                 request.url.path), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, Problem(500, "internal_error",
                                             "something went wrong on our side; nothing was "
                                             "changed unless the response said so").body(
                                                 request.url.path),
                                # The server drops the connection after an unhandled error;
                                # say so, so a pooled client does not reuse it (ECONNRESET).
                                {"Connection": "close"})

    @app.exception_handler(BillingRefused)
    async def _billing_refused(request: Request, exc: BillingRefused) -> Response:
        return problem_response(502, Problem(502, "billing_refused",
                                             "the billing backend refused the request; "
                                             "nothing was changed").body(request.url.path))

    @app.exception_handler(BillingUnavailable)
    async def _billing_down(request: Request, exc: BillingUnavailable) -> Response:
        return problem_response(503, Problem(503, "billing_unavailable",
                                             "the billing backend is unavailable, retry later"
                                             ).body(request.url.path), {"Retry-After": "5"})


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route answers fully on this path (routers nest, so ask them)."""
    routes = request.app.router.routes
    return ", ".join(m for m in _METHODS if any(
        r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes))


class _EdgeMiddleware:
    """Times every request per route; refuses U+0000 in the path or query string, a request
    target over 8 KiB (414) and headers over 16 KiB (431) (``check_request_head``).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` runs each request through a
    task group and memory streams, which cost more CPU than the rest of the route here.
    PostgreSQL cannot store U+0000, so it is refused up front rather than deep inside.
    """

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app = app
        self.latency = latency
        # The histogram's children by (method, route, status): ``labels()`` validates and
        # locks on every call. Bounded: the parser knows a fixed set of methods, the routes
        # and statuses are ours.
        self._children: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        refused = check_request_head(scope.get("headers", ()), raw_path,
                                     scope.get("query_string", b""))
        if refused is not None:
            problem = Problem(refused.status, refused.code, refused.detail)
            await problem_response(problem.status, problem.body(),
                                   {"Connection": "close"})(scope, receive, send)
            return
        path: str = scope["path"]
        raw_query: bytes = scope.get("query_string", b"")
        query = unquote_plus(raw_query.decode("latin-1")) if raw_query else ""
        if "\x00" in path or "\x00" in query:
            instance = path.replace("\x00", "")
            if "\x00" in path and scope["method"] == "GET":  # no such resource can exist
                problem = Problem(404, "not_found", "no such resource")
            else:
                problem = validation_problem([{
                    "field": "path" if "\x00" in path else "query",
                    "message": "must not contain NUL characters"}])
            await problem_response(problem.status, problem.body(instance))(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            elapsed = time.perf_counter() - start
            key = (scope["method"], getattr(scope.get("route"), "path", "unmatched"), status)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.latency.labels(key[0], key[1], str(status))
            child.observe(elapsed)
