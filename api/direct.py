"""A direct path to the routes every generation calls: the same functions, less framework.

``POST /api/v1/generations`` and ``POST /api/v1/generations/{generation_id}/selection`` are
two of a generation's requests, and FastAPI's router, dependency solver and per-route
exception and exit-stack wrappers cost more CPU than everything those routes do themselves
(the bench's profile: ``solve_dependencies`` alone was a quarter of the event loop). This
middleware, the innermost one, answers them by calling **the route's own dependencies and
endpoint** — read from FastAPI's ``Dependant`` of the route, so nothing is declared twice —
and renders an exception with **the app's own exception handlers**, the way Starlette's route
wrapper does. Every other request, and these routes under any other method, go through
FastAPI unchanged; the middleware outside this one (the edge checks and timing, server
errors, tracing) sees both paths alike.

A route is taken only if :func:`compile_route` can prove the shortcut equivalent: dependencies
that are ``async`` functions of the ``Request`` and of plain ``str`` path parameters, without
sub-dependencies, security scopes or yield, declared once each; no parameter, body or
``response_model`` serialisation that FastAPI would do itself; an endpoint that returns a
``Response``. Anything else raises at start-up rather than behaving differently.
``tests/unit/test_direct_routes.py`` sends the same good and bad requests through
both paths and compares status, headers and body.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._utils import get_route_path, is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["DirectRoutes", "compile_route"]

_Dependency = tuple[str, Callable[..., Awaitable[Any]], str | None, tuple[str, ...]]


@dataclass(frozen=True)
class _Compiled:
    route: APIRoute
    endpoint: Callable[..., Awaitable[Any]]
    request_param: str | None
    dependencies: tuple[_Dependency, ...]  # (param name, call, request param, path params)


class NotDirect(Exception):
    """The route needs something of FastAPI's that the direct path does not do."""


def _plain_str_path_param(field: Any) -> bool:
    """``name: str`` with no constraint or alias: FastAPI's validation passes it unchanged."""
    info = field.field_info
    return bool(info.annotation is str and not info.metadata and field.alias == field.name
                and info.validation_alias is None)


def compile_route(route: APIRoute) -> _Compiled:
    """The route's dependency calls in FastAPI's order, or :class:`NotDirect`."""
    dependant = route.dependant
    if route.body_field is not None or dependant.call is None:
        raise NotDirect(f"{route.path}: FastAPI reads its body")
    if not asyncio.iscoroutinefunction(dependant.call):
        raise NotDirect(f"{route.path}: the endpoint is not an async function")
    returns = typing.get_type_hints(dependant.call).get("return")
    if not (isinstance(returns, type) and issubclass(returns, Response)):
        raise NotDirect(f"{route.path}: the endpoint must return a Response")
    _only_request(dependant, route.path, path_params_allowed=False)
    dependencies: list[_Dependency] = []
    seen: set[int] = set()
    for sub in dependant.dependencies:
        call = sub.call
        if sub.name is None or call is None or not asyncio.iscoroutinefunction(call):
            raise NotDirect(f"{route.path}: dependency {sub.name} is not an async function")
        if sub.dependencies or sub.own_oauth_scopes or sub.parent_oauth_scopes \
                or sub.scope == "request" or sub.concurrency is not None:
            raise NotDirect(f"{route.path}: dependency {sub.name} has dependencies or scopes")
        if id(call) in seen:  # FastAPI would call it once and reuse the value
            raise NotDirect(f"{route.path}: dependency {sub.name} is declared twice")
        seen.add(id(call))
        _only_request(sub, route.path, path_params_allowed=True)
        path_params = tuple(field.name for field in sub.path_params)
        dependencies.append((sub.name, call, sub.request_param_name, path_params))
    return _Compiled(route, dependant.call, dependant.request_param_name, tuple(dependencies))


def _only_request(dependant: Any, path: str, *, path_params_allowed: bool) -> None:
    if dependant.query_params or dependant.header_params or dependant.cookie_params \
            or dependant.body_params:
        raise NotDirect(f"{path}: {dependant.name or 'endpoint'} has FastAPI parameters")
    if dependant.path_params and not (path_params_allowed and all(
            _plain_str_path_param(f) for f in dependant.path_params)):
        raise NotDirect(f"{path}: {dependant.name or 'endpoint'} has typed path parameters")
    if dependant.websocket_param_name or dependant.http_connection_param_name \
            or dependant.response_param_name or dependant.background_tasks_param_name \
            or dependant.security_scopes_param_name:
        raise NotDirect(f"{path}: {dependant.name or 'endpoint'} needs more than the Request")


class DirectRoutes:
    """ASGI middleware: ``routes`` answered by their own functions, the rest by ``app``.

    ``fastapi_app`` supplies the exception handlers (those of status 500 / ``Exception`` are
    left to the server-error middleware outside, as FastAPI does) and the router recorded in
    the scope. A route is matched as Starlette would: its path regex on the scope's route
    path, its method set; the routes must be the first FastAPI would match for those paths
    (the test above checks that for the app).
    """

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, routes: Sequence[APIRoute]) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.routes = tuple(compile_route(r) for r in routes)
        self.methods = frozenset(m for r in routes for m in (r.methods or ()))
        handlers = fastapi_app.exception_handlers
        self.status_handlers = {k: v for k, v in handlers.items()
                                if isinstance(k, int) and k != 500}
        self.exception_handlers = {k: v for k, v in handlers.items()
                                   if not isinstance(k, int) and k is not Exception}

    def _match(self, scope: Scope) -> tuple[_Compiled, dict[str, str]] | None:
        if scope["type"] != "http" or scope["method"] not in self.methods \
                or self.fastapi_app.dependency_overrides:
            return None
        path = get_route_path(scope)
        for compiled in self.routes:
            route = compiled.route
            found = route.path_regex.match(path)
            if found is not None and scope["method"] in (route.methods or ()):
                return compiled, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self._match(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        compiled, path_params = matched
        # What the router leaves in the scope for the layers outside (the edge middleware's
        # route label) and for Request.path_params.
        scope["endpoint"] = compiled.endpoint
        scope["path_params"] = path_params
        scope["route"] = compiled.route
        scope.setdefault("router", self.fastapi_app.router)
        request = Request(scope, receive, send)
        try:
            values: dict[str, Any] = {}
            for name, call, request_param, path_names in compiled.dependencies:
                kwargs: dict[str, Any] = {p: path_params[p] for p in path_names}
                if request_param is not None:
                    kwargs[request_param] = request
                values[name] = await call(**kwargs)
            if compiled.request_param is not None:
                values[compiled.request_param] = request
            response = await compiled.endpoint(**values)
            if not isinstance(response, Response):
                raise TypeError(f"{compiled.route.path} returned {type(response).__name__}")
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            if is_async_callable(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            # As Starlette's route wrapper: a reused exception must not keep its traceback.
            exc.__traceback__ = None
            if response is None:
                return
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Any:
        handler = None
        if isinstance(exc, HTTPException):
            handler = self.status_handlers.get(exc.status_code)
        if handler is None:
            for cls in type(exc).__mro__:
                if cls in self.exception_handlers:
                    return self.exception_handlers[cls]
        return handler
