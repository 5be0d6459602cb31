"""What every route depends on: the service ports, roles, bodies and idempotent commands.

Routes declare these as ``Annotated`` parameters (``role: ServiceRole``,
``body: Annotated[SelectionBody, Body(SelectionBody)]``); FastAPI resolves them in the order
they are declared, so authentication always runs before the body is read.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from api.asset_links import S3Links
from api.problems import DOMAIN_STATUS, Problem, field_errors, problem_response, validation_problem
from api.threads import blocking
from saga.commands import StoreResponse
from saga.errors import DomainError
from saga.input_policy import (
    JsonRefused,
    JsonTooDeep,
    check_user_id,
    loads_bounded,
    validated_body_hash,
)
from saga.inputs import find_nul
from saga.ports import AlreadyAnswered, IdempotencyRace, IdempotencyRecord

B = TypeVar("B", bound=BaseModel)
MAX_BODY_BYTES = 64 * 1024
Cursor = tuple[datetime, str]


# ------------------------------------------------------------------ the service's ports
class CommandBus(Protocol):
    """:class:`saga.messagebus.MessageBus`: runs one command."""

    def handle(self, cmd: object, idem: IdempotencyRecord | None = None) -> Any: ...


class ReadModel(Protocol):
    """:class:`saga.queries.Queries`: reads that change nothing."""

    def get(self, generation_id: str) -> dict[str, Any]: ...

    def list_generations(self, *, user_id: str | None, state: str | None, limit: int,
                         after: Cursor | None) -> tuple[list[dict[str, Any]], Cursor | None]: ...

    def history(self, generation_id: str) -> dict[str, Any]: ...

    def account(self, user_id: str) -> dict[str, Any]: ...

    def stored_response(self, idem: IdempotencyRecord) -> tuple[str, int, Any] | None: ...

    def attention(self, *, limit: int, after: Cursor | None
                  ) -> tuple[list[dict[str, Any]], Cursor | None]: ...


@dataclass
class ApiDeps:
    bus: CommandBus
    queries: ReadModel
    api_keys: dict[str, str]  # key -> role
    readiness: dict[str, Callable[[], bool]] = field(default_factory=dict)
    registry: CollectorRegistry | None = None
    assets_dir: Path | None = None
    worker_threads: int = 40  # threads running blocking handlers (each needs a DB connection)
    # Hosts that Odoo-supplied URLs may name although internal (AIGEN_INPUT_ASSET_HOSTS).
    input_asset_hosts: tuple[str, ...] = ()
    public_docs: bool = True  # /docs, /redoc and /openapi.json without a key (AIGEN_PUBLIC_DOCS)
    metrics_token: str | None = None  # if set, /metrics needs it as a bearer token
    asset_links: S3Links | None = None  # presigned download links for s3:// assets, if set


# The dependencies below do no I/O, so they are ``async``: FastAPI runs a plain ``def``
# dependency in the thread pool, a hand-off (and GIL churn) per dependency per request.
async def get_deps(request: Request) -> ApiDeps:
    deps: ApiDeps = request.app.state.deps
    return deps


Deps = Annotated[ApiDeps, Depends(get_deps)]


# ------------------------------------------------------------------ roles
def require(*roles: str) -> Callable[[Request], Awaitable[str]]:
    """A dependency returning the caller's role; 401 without a valid key, 403 wrong role."""

    # async, like every dependency here that does no I/O (see get_deps).
    async def dependency(request: Request) -> str:
        keys: list[tuple[bytes, str]] = request.app.state.api_keys
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.strip().encode()
        # Constant-time comparison: a key must not be guessable from response times.
        role = next((r for k, r in keys if hmac.compare_digest(k, given)), None) \
            if scheme.lower() == "bearer" else None
        if role is None:
            raise Problem(401, "unauthorized", "a valid API key is required "
                          "(Authorization: Bearer <key>)")
        if role not in roles:
            raise Problem(403, "forbidden", f"this call needs the role {' or '.join(roles)}")
        return role

    return dependency


ServiceRole = Annotated[str, Depends(require("service"))]
SupportRole = Annotated[str, Depends(require("support"))]
AnyRole = Annotated[str, Depends(require("service", "support"))]


async def account_id(user_id: str) -> str:
    """The ``{user_id}`` path segment, checked (safe user id rule) before the body is read."""
    reason = check_user_id(user_id)
    if reason is not None:
        raise validation_problem([{"field": "user_id", "message": reason}])
    return user_id


AccountId = Annotated[str, Depends(account_id)]
IDEMPOTENCY_SCOPE_MAX = 320  # the width of idempotency_keys.scope
GENERATION_ID_MAX = 36  # the width of generations.id: a longer id cannot exist


async def generation_id(generation_id: str) -> str:
    """The ``{generation_id}`` path segment: 404 for an id no generation can have, before
    the database is asked (or an idempotency scope longer than its column is written)."""
    if not 1 <= len(generation_id) <= GENERATION_ID_MAX:
        raise Problem(404, "not_found", "no such generation")
    return generation_id


GenerationId = Annotated[str, Depends(generation_id)]


# ------------------------------------------------------------------ bodies
def Body(model: type[B], *, optional: bool = False) -> Any:
    """A dependency parsing the JSON body into ``model`` (size, JSON, NUL and schema checks).

    The body is read by hand rather than by FastAPI so that every refusal is one of our
    problem responses and the size limit applies before parsing.
    """

    async def parse(request: Request) -> B:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise Problem(413, "payload_too_large",
                          f"bodies are limited to {MAX_BODY_BYTES} bytes")
        if optional and not raw.strip():
            raw = b"{}"
        try:
            data = loads_bounded(raw)
        except JsonTooDeep as exc:
            raise validation_problem([{"field": "body", "message": str(exc)}],
                                     "the body is nested too deeply") from None
        except JsonRefused:
            raise validation_problem([{"field": "body", "message": "the body is not valid JSON"}],
                                     "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise validation_problem([{"field": "body", "message": "must be a JSON object"}])
        nul = find_nul(data)
        if nul is not None:
            raise validation_problem([{"field": nul or "body",
                                       "message": "must not contain NUL characters"}])
        deps: ApiDeps = request.app.state.deps
        try:
            return model.model_validate(data, context={
                "input_asset_hosts": deps.input_asset_hosts})
        except ValidationError as exc:
            raise validation_problem(field_errors(exc)) from None

    return Depends(parse)


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that :func:`Body` reads by hand."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


# ------------------------------------------------------------------ errors and queries
def domain_problem(exc: DomainError) -> Problem:
    status = DOMAIN_STATUS.get(exc.code, 409)
    extra = dict(exc.extra)
    if status == 422:
        extra = {"errors": [{"field": str(extra.pop("field", "body")),
                             "message": exc.message}], **extra}
    return Problem(status, exc.code, exc.message, **extra)


async def query(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking read in a worker thread; a domain refusal becomes its problem."""
    try:
        return await blocking(fn, *args, **kwargs)
    except DomainError as exc:
        raise domain_problem(exc) from None


# ------------------------------------------------------------------ idempotent commands
def _idempotency(request: Request, role: str, *, required: bool) -> IdempotencyRecord | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        if required:
            raise Problem(400, "idempotency_key_required",
                          "this call needs an Idempotency-Key header")
        return None
    if not 1 <= len(key) <= 255:
        raise Problem(400, "idempotency_key_invalid",
                      "the Idempotency-Key header must be 1 to 255 characters")
    scope = f"{role} {request.method} {request.url.path}"
    if len(scope) > IDEMPOTENCY_SCOPE_MAX:  # only a path no resource has is this long
        raise Problem(404, "not_found", "no such resource")
    return IdempotencyRecord(scope, key, "")


def _replay(idem: IdempotencyRecord, stored: tuple[str, int, Any]) -> Response:
    digest, status, body = stored
    if digest != idem.request_hash:
        raise Problem(409, "idempotency_key_reused",
                      "this Idempotency-Key was used with a different body")
    return problem_response(status, body, {"Idempotent-Replayed": "true"})


async def command(request: Request, deps: ApiDeps, role: str, body: BaseModel, status: int,
                  cmd: object, *, key_required: bool = False) -> Response:
    """Run ``cmd`` on the bus under the request's Idempotency-Key (if any).

    A key already answered replays the stored response (409 if the body differs); a refusal
    other than 422 is stored under the key too, so a retry gets the same answer.

    One hand-off to a worker thread per request, whatever the outcome: the handler checks the
    stored response inside the command's own transaction (``saga.handlers.idempotent``), and
    the rarer follow-ups (storing a refusal, reading the winner of a race) run in the same
    thread right after it.
    """
    idem = _idempotency(request, role, required=key_required)
    if idem is not None:
        # Canonical JSON (sorted keys): the same request with its keys reordered replays.
        # Same digest as body_hash (a key stored before this release still matches).
        digest = validated_body_hash(body.model_dump(mode="json"))
        idem = IdempotencyRecord(idem.scope, idem.key, digest)
    return await blocking(_run_command, deps, cmd, idem, status, request.url.path)


def _run_command(deps: ApiDeps, cmd: object, idem: IdempotencyRecord | None, status: int,
                 path: str) -> Response:
    """:func:`command`'s blocking part, in the worker thread."""
    bus = deps.bus

    def stored_replay(record: IdempotencyRecord) -> Response:
        stored = deps.queries.stored_response(record)
        assert stored is not None
        return _replay(record, stored)

    try:
        result = bus.handle(cmd, idem)
    except AlreadyAnswered as answered:
        assert idem is not None
        return _replay(idem, answered.stored)
    except IdempotencyRace:
        assert idem is not None
        return stored_replay(idem)
    except DomainError as exc:
        problem = domain_problem(exc)
        body_out = problem.body(path)
        if idem is not None and problem.status != 422:
            try:
                bus.handle(StoreResponse(idem, problem.status, body_out))
            except IdempotencyRace:
                return stored_replay(idem)
        return problem_response(problem.status, body_out)
    return JSONResponse(result, status_code=status)
