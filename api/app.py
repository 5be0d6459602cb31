"""The FastAPI application. Routes authenticate, validate, build a command and call the
shared :class:`saga.messagebus.MessageBus`; they hold no business rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from anyio import to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import (
    DOMAIN_STATUS,
    Problem,
    field_errors,
    problem_response,
    validation_problem,
)
from api.schemas import (
    CancelBody,
    GrantBody,
    RegenerateBody,
    SelectionBody,
    SetPlanBody,
    StartGenerationBody,
    State,
)
from saga.commands import (
    Cancel,
    Grant,
    Regenerate,
    SelectSample,
    SetPlan,
    StartGeneration,
    StoreResponse,
)
from saga.errors import BillingUnavailable, DomainError
from saga.inputs import find_nul
from saga.messagebus import MessageBus
from saga.ports import AlreadyAnswered, IdempotencyRace, IdempotencyRecord
from saga.queries import Queries

log = logging.getLogger(__name__)
B = TypeVar("B", bound=BaseModel)
MAX_BODY_BYTES = 64 * 1024


@dataclass
class ApiDeps:
    bus: MessageBus
    queries: Queries
    api_keys: dict[str, str]  # key -> role
    readiness: dict[str, Callable[[], bool]] = field(default_factory=dict)
    registry: CollectorRegistry | None = None
    assets_dir: Path | None = None
    worker_threads: int = 40  # threads running blocking handlers (each needs a DB connection)


def create_app(deps: ApiDeps) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Handlers block on the database; more threads than connections only adds GIL churn.
        to_thread.current_default_thread_limiter().total_tokens = deps.worker_threads
        yield

    app = FastAPI(title="aigen-orchestrator", version="0.1.0", lifespan=lifespan,
                  description="CreativeFlow AI generation saga coordinator")
    bus, queries = deps.bus, deps.queries
    registry = deps.registry or CollectorRegistry()
    latency = Histogram("aigen_http_request_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    app.add_middleware(_EdgeMiddleware, latency=latency)

    # -- errors ---------------------------------------------------------------------------
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
        return problem_response(exc.status_code,
                                Problem(exc.status_code, code, str(exc.detail)).body(
                                    request.url.path))

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
                                                 request.url.path))

    @app.exception_handler(BillingUnavailable)
    async def _billing_down(request: Request, exc: BillingUnavailable) -> Response:
        return problem_response(503, Problem(503, "billing_unavailable",
                                             "the billing backend is unavailable, retry later"
                                             ).body(request.url.path), {"Retry-After": "5"})

    # -- auth -------------------------------------------------------------------------------
    api_keys = [(k.encode(), role) for k, role in deps.api_keys.items()]

    def require(*roles: str) -> Callable[[Request], str]:
        def dependency(request: Request) -> str:
            header = request.headers.get("authorization", "")
            scheme, _, key = header.partition(" ")
            given = key.strip().encode()
            # Constant-time comparison: a key must not be guessable from response times.
            role = next((r for k, r in api_keys if hmac.compare_digest(k, given)), None) \
                if scheme.lower() == "bearer" else None
            if role is None:
                raise Problem(401, "unauthorized", "a valid API key is required "
                              "(Authorization: Bearer <key>)")
            if role not in roles:
                raise Problem(403, "forbidden", f"this call needs the role {' or '.join(roles)}")
            return role
        return dependency

    service_role = Depends(require("service"))
    support_role = Depends(require("support"))
    any_role = Depends(require("service", "support"))

    # -- helpers ----------------------------------------------------------------------------
    async def parse(request: Request, model: type[B], *, optional: bool = False) -> B:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise Problem(413, "payload_too_large", f"bodies are limited to {MAX_BODY_BYTES} "
                          "bytes")
        if optional and not raw.strip():
            raw = b"{}"
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise validation_problem([{"field": "body", "message": "the body is not valid JSON"}],
                                     "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise validation_problem([{"field": "body", "message": "must be a JSON object"}])
        nul = find_nul(data)
        if nul is not None:
            raise validation_problem([{"field": nul or "body",
                                       "message": "must not contain NUL characters"}])
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise validation_problem(field_errors(exc)) from None

    def idempotency(request: Request, role: str, *, required: bool) -> IdempotencyRecord | None:
        key = request.headers.get("idempotency-key")
        if key is None:
            if required:
                raise Problem(400, "idempotency_key_required",
                              "this call needs an Idempotency-Key header")
            return None
        if not 1 <= len(key) <= 255:
            raise Problem(400, "idempotency_key_invalid",
                          "the Idempotency-Key header must be 1 to 255 characters")
        return IdempotencyRecord(f"{role} {request.method} {request.url.path}", key, "")

    async def command(request: Request, role: str, body: BaseModel, status: int,
                      run: Callable[[IdempotencyRecord | None], dict[str, Any]],
                      *, key_required: bool = False) -> Response:
        idem = idempotency(request, role, required=key_required)
        if idem is not None:
            digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
            idem = IdempotencyRecord(idem.scope, idem.key, digest)
        try:
            result = await run_in_threadpool(run, idem)
        except AlreadyAnswered as answered:
            assert idem is not None
            return replay(idem, answered.stored)
        except IdempotencyRace:
            assert idem is not None
            stored = await run_in_threadpool(queries.stored_response, idem)
            assert stored is not None
            return replay(idem, stored)
        except DomainError as exc:
            problem = domain_problem(exc)
            body_out = problem.body(request.url.path)
            if idem is not None and problem.status != 422:
                try:
                    await run_in_threadpool(bus.handle, StoreResponse(idem, problem.status,
                                                                          body_out))
                except IdempotencyRace:
                    stored = await run_in_threadpool(queries.stored_response, idem)
                    assert stored is not None
                    return replay(idem, stored)
            return problem_response(problem.status, body_out)
        return JSONResponse(result, status_code=status)

    def replay(idem: IdempotencyRecord, stored: tuple[str, int, Any]) -> Response:
        digest, status, body = stored
        if digest != idem.request_hash:
            raise Problem(409, "idempotency_key_reused",
                          "this Idempotency-Key was used with a different body")
        return problem_response(status, body, {"Idempotent-Replayed": "true"})

    def domain_problem(exc: DomainError) -> Problem:
        status = DOMAIN_STATUS.get(exc.code, 409)
        extra = dict(exc.extra)
        if status == 422:
            extra = {"errors": [{"field": str(extra.pop("field", "body")),
                                 "message": exc.message}], **extra}
        return Problem(status, exc.code, exc.message, **extra)

    async def query(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except DomainError as exc:
            raise domain_problem(exc) from None

    # -- generations ---------------------------------------------------------------------------
    base = "/api/v1"

    @app.post(f"{base}/generations", status_code=202,
              openapi_extra=_body_schema(StartGenerationBody))
    async def start_generation(request: Request, role: str = service_role) -> Response:
        """Start a generation: hold the sample round's credits and dispatch the samples job."""
        body = await parse(request, StartGenerationBody)
        cmd = StartGeneration(
            user_id=body.user_id, prompt=body.prompt, format=body.format_spec(),
            negative_prompt=body.negative_prompt, style=body.style.model_dump(),
            brand=body.brand.model_dump(), input_assets=body.input_assets,
            sample_count=body.sample_count, project_id=body.project_id,
            metadata=body.metadata)
        return await command(request, role, body, 202, lambda i: bus.handle(cmd, i),
                             key_required=True)

    @app.get(f"{base}/generations/{{generation_id}}")
    async def get_generation(generation_id: str, role: str = any_role) -> Any:
        """Read one generation."""
        return await query(queries.get, generation_id)

    @app.post(f"{base}/generations/{{generation_id}}/selection", status_code=202,
              openapi_extra=_body_schema(SelectionBody))
    async def select_sample(generation_id: str, request: Request,
                            role: str = service_role) -> Response:
        """Choose a delivered sample; holds the final's credits and dispatches the final job."""
        body = await parse(request, SelectionBody)
        cmd = SelectSample(generation_id, body.sample_id, body.resolution)
        return await command(request, role, body, 202, lambda i: bus.handle(cmd, i))

    @app.post(f"{base}/generations/{{generation_id}}/regenerate", status_code=202,
              openapi_extra=_body_schema(RegenerateBody))
    async def regenerate(generation_id: str, request: Request,
                         role: str = service_role) -> Response:
        """Start a new sample round (its own hold) from ``awaiting_selection``."""
        body = await parse(request, RegenerateBody, optional=True)
        cmd = Regenerate(generation_id, body.prompt)
        return await command(request, role, body, 202, lambda i: bus.handle(cmd, i))

    @app.post(f"{base}/generations/{{generation_id}}/cancel",
              openapi_extra=_body_schema(CancelBody))
    async def cancel(generation_id: str, request: Request, role: str = service_role) -> Response:
        """Cancel a generation that is not terminal; releases any open hold."""
        body = await parse(request, CancelBody, optional=True)
        cmd = Cancel(generation_id, body.reason)
        return await command(request, role, body, 200, lambda i: bus.handle(cmd, i))

    @app.get(f"{base}/generations")
    async def list_generations(user_id: str | None = None, state: State | None = None,
                               limit: int = 20, cursor: str | None = None,
                               role: str = support_role) -> Any:
        """List generations, newest first, with an opaque cursor."""
        errors = []
        if user_id is not None and not 1 <= len(user_id) <= 64:
            errors.append({"field": "user_id", "message": "must be 1 to 64 characters"})
        if not 1 <= limit <= 100:
            errors.append({"field": "limit", "message": "must be between 1 and 100"})
        after = None
        if cursor is not None:
            try:
                after = _decode_cursor(cursor)
            except ValueError:
                errors.append({"field": "cursor", "message": "is not a cursor from this API"})
        if errors:
            raise validation_problem(errors)
        items, next_after = await query(queries.list_generations, user_id=user_id, state=state,
                                        limit=limit, after=after)
        return {"items": items, "next_cursor": _encode_cursor(next_after) if next_after else None}

    @app.get(f"{base}/generations/{{generation_id}}/history")
    async def history(generation_id: str, role: str = support_role) -> Any:
        """The saga's full history: transitions, credit steps, messages in and out, refusals."""
        return await query(queries.history, generation_id)

    # -- accounts ------------------------------------------------------------------------------
    @app.get(f"{base}/accounts/{{user_id}}")
    async def get_account(user_id: str, role: str = any_role) -> Any:
        """Balance, open holds and what is available."""
        return await query(queries.account, user_id)

    @app.put(f"{base}/accounts/{{user_id}}", openapi_extra=_body_schema(SetPlanBody))
    async def set_plan(user_id: str, request: Request, role: str = service_role) -> Response:
        """Set the plan; creates the account with balance 0 if new."""
        _check_user_id(user_id)
        body = await parse(request, SetPlanBody)
        cmd = SetPlan(user_id, body.plan)
        return await command(request, role, body, 200, lambda i: bus.handle(cmd, i))

    @app.post(f"{base}/accounts/{{user_id}}/grants", status_code=201,
              openapi_extra=_body_schema(GrantBody))
    async def grant(user_id: str, request: Request, role: str = service_role) -> Response:
        """Add credits; a new account starts on the free plan."""
        _check_user_id(user_id)
        body = await parse(request, GrantBody)
        cmd = Grant(user_id, Decimal(body.amount), body.reason)
        return await command(request, role, body, 201, lambda i: bus.handle(cmd, i))

    # -- operations ----------------------------------------------------------------------------
    @app.get("/health/live")
    async def live() -> Any:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> Response:
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

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if deps.assets_dir is not None:
        deps.assets_dir.mkdir(parents=True, exist_ok=True)
        app.mount("/assets", StaticFiles(directory=deps.assets_dir), name="assets")

    return app


def _check_user_id(user_id: str) -> None:
    if not 1 <= len(user_id) <= 64:
        raise validation_problem([{"field": "user_id", "message": "must be 1 to 64 characters"}])


class _EdgeMiddleware:
    """Times every request per route and refuses U+0000 in the path or query string.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` runs each request through a
    task group and memory streams, which cost more CPU than the rest of the route here.
    PostgreSQL cannot store U+0000, so it is refused up front rather than deep inside.
    """

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        query = unquote_plus(scope.get("query_string", b"").decode("latin-1"))
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
            route = getattr(scope.get("route"), "path", "unmatched")
            self.latency.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - start)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def _encode_cursor(after: tuple[datetime, str]) -> str:
    raw = json.dumps([after[0].isoformat(), after[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, last_id = json.loads(raw)
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None or not isinstance(last_id, str):
            raise ValueError
        return parsed, last_id
    except Exception as exc:  # any malformed cursor is the caller's mistake
        raise ValueError("bad cursor") from exc
