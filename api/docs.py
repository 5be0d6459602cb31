"""Interactive API docs that work offline, and the bearer scheme behind their Authorize button.

FastAPI's stock ``/docs`` and ``/redoc`` pages load Swagger UI and ReDoc from a CDN, so they
are blank without internet. :func:`install_docs` replaces them with the same pages whose
scripts and styles are served by this service from the ``fastapi-offline`` package, which
ships Swagger UI's and ReDoc's distribution files. The OpenAPI document gains an HTTP bearer
security scheme so that the Authorize button takes an API key and sends it on every call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from api.deps import require

ASSETS_PATH = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
BEARER = "ApiKey"


def install_docs(app: FastAPI, *, public: bool = True) -> None:
    """Serve ``/docs`` and ``/redoc`` with local assets; call once from ``create_app``.

    ``public=False`` (``AIGEN_PUBLIC_DOCS=false``): the pages and ``/openapi.json`` need an
    API key of any role, like the API itself (the static assets stay public: they are
    Swagger UI's and ReDoc's own files).
    """
    guard = [] if public else [Depends(require("service", "support"))]
    docs_url, redoc_url = app.docs_url or "/docs", app.redoc_url or "/redoc"
    oauth_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"
    openapi_url = app.openapi_url or "/openapi.json"
    replaced = {docs_url, redoc_url, oauth_url, openapi_url}
    app.router.routes[:] = [r for r in app.router.routes
                            if getattr(r, "path", None) not in replaced]
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(docs_url, include_in_schema=False, dependencies=guard)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} — API docs",
            oauth2_redirect_url=oauth_url,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True})

    @app.get(oauth_url, include_in_schema=False)
    async def oauth_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False, dependencies=guard)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} — API reference",
                              redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
                              with_google_fonts=False)

    @app.get(openapi_url, include_in_schema=False, dependencies=guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(document(app))


def document(app: FastAPI) -> dict[str, Any]:
    """The served OpenAPI document: FastAPI's, with the bearer scheme and :func:`complete`."""
    return complete(with_bearer(app.openapi()))


def with_bearer(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the API key as an HTTP bearer scheme on every ``/api/`` operation (in place,
    idempotent: FastAPI caches the document and hands out the same dict)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key: the service key (Odoo) or the support key. The embedded "
                       "default prints dev-service-key and dev-support-key at start-up."}
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/api/"):  # health, metrics and assets need no key
            for operation in operations.values():
                operation.setdefault("security", [{BEARER: []}])
    return schema


# ------------------------------------------------------------------ a truthful document
# Which ``code`` each status carries (api.problems.DOMAIN_STATUS, api.deps, api.app).
CODE_STATUS: dict[str, int] = {
    "idempotency_key_required": 400, "idempotency_key_invalid": 400,
    "unauthorized": 401, "insufficient_credits": 402, "quota_exceeded": 402,
    "forbidden": 403, "not_found": 404, "invalid_state": 409,
    "idempotency_key_reused": 409, "external_billing": 409, "generation_unreadable": 409,
    "payload_too_large": 413,
    "uri_too_long": 414, "validation_error": 422, "unknown_sample": 422,
    "request_header_fields_too_large": 431, "service_unavailable": 503,
    "billing_unavailable": 503,
}
_EDGE = ("uri_too_long", "request_header_fields_too_large")
_KEYED = ("idempotency_key_invalid", "idempotency_key_reused", "payload_too_large",
          "validation_error", "forbidden")
_GEN = "/api/v1/generations/{generation_id}"
_ACCOUNT = "/api/v1/accounts/{user_id}"
# The refusals of every operation under /api/ (besides 401 unauthorized and the edge limits).
OPERATION_CODES: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", "/api/v1/generations"): (
        *_KEYED, "idempotency_key_required", "insufficient_credits", "quota_exceeded",
        "service_unavailable", "billing_unavailable"),
    ("get", "/api/v1/generations"): ("forbidden", "validation_error", "service_unavailable"),
    ("get", _GEN): ("not_found", "generation_unreadable", "service_unavailable"),
    ("post", _GEN + "/selection"): (
        *_KEYED, "not_found", "invalid_state", "generation_unreadable", "unknown_sample",
        "insufficient_credits", "quota_exceeded", "service_unavailable", "billing_unavailable"),
    ("post", _GEN + "/regenerate"): (
        *_KEYED, "not_found", "invalid_state", "generation_unreadable", "insufficient_credits",
        "quota_exceeded", "service_unavailable", "billing_unavailable"),
    ("post", _GEN + "/cancel"): (
        *_KEYED, "not_found", "invalid_state", "generation_unreadable", "service_unavailable",
        "billing_unavailable"),
    ("get", _GEN + "/history"): ("forbidden", "not_found", "service_unavailable"),
    ("get", _GEN + "/diagram"): ("forbidden", "not_found", "service_unavailable"),
    ("get", _ACCOUNT): ("not_found", "validation_error", "service_unavailable"),
    ("put", _ACCOUNT): (*_KEYED, "external_billing", "service_unavailable",
                        "billing_unavailable"),
    ("post", _ACCOUNT + "/grants"): (*_KEYED, "external_billing", "service_unavailable",
                                     "billing_unavailable"),
    ("get", "/api/v1/state-machine"): (),
    ("get", "/api/v1/attention"): ("forbidden", "validation_error", "service_unavailable"),
    ("post", _GEN + "/support/retry"): (*_KEYED, "not_found", "invalid_state",
                                         "service_unavailable"),
    ("post", _GEN + "/support/cancel"): (*_KEYED, "not_found", "invalid_state",
                                          "generation_unreadable", "service_unavailable",
                                          "billing_unavailable"),
    ("post", _GEN + "/support/resolve"): (*_KEYED, "not_found", "invalid_state",
                                           "generation_unreadable", "service_unavailable"),
    ("get", "/api/v1/dead-letters"): ("forbidden", "validation_error", "service_unavailable"),
    ("post", "/api/v1/dead-letters/{dead_letter_id}/replay"): (
        *_KEYED, "not_found", "invalid_state", "service_unavailable"),
    ("post", "/api/v1/dead-letters/{dead_letter_id}/discard"): (
        *_KEYED, "not_found", "invalid_state", "service_unavailable"),
}
# An operation missing from the table still gets a plausible set (and the OpenAPI test fails,
# so that it is added): /openapi.json must never break in production over a new route.
_DEFAULT_CODES = ("forbidden", "not_found", "validation_error", "service_unavailable")
# Operations whose body api.deps.Body reads by hand, and which take an Idempotency-Key.
IDEMPOTENT = {("post", "/api/v1/generations"): True, ("post", _GEN + "/selection"): False,
              ("post", _GEN + "/regenerate"): False, ("post", _GEN + "/cancel"): False,
              ("put", _ACCOUNT): False, ("post", _ACCOUNT + "/grants"): False,
              **{("post", _GEN + f"/support/{action}"): False
                 for action in ("retry", "cancel", "resolve")},
              **{("post", f"/api/v1/dead-letters/{{dead_letter_id}}/{action}"): False
                 for action in ("replay", "discard")}}

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "Problem",
    "description": "An RFC 9457 problem; `code` is the machine-readable reason.",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "examples": ["urn:creativeflow:problem:not_found"]},
        "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "code": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "description": "422 only: the refused fields",
                   "items": {"$ref": "#/components/schemas/FieldError"}},
        "state": {"type": "string", "description": "invalid_state, generation_unreadable: "
                  "the current state"},
        "generation_id": {"type": "string",
                          "description": "generation_unreadable: the generation's id"},
        "attention": {"anyOf": [{"$ref": "#/components/schemas/Attention"}, {"type": "null"}],
                      "description": "generation_unreadable: why it is parked, or null "
                      "while nothing has parked it yet"},
    },
    "additionalProperties": True,
}
FIELD_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "FieldError", "required": ["field", "message"],
    "properties": {"field": {"type": "string", "examples": ["input_assets.0"]},
                   "message": {"type": "string"}}}


def _problem_response(codes: list[str]) -> dict[str, Any]:
    return {"description": "Refused: " + ", ".join(f"`{c}`" for c in codes),
            "content": {"application/problem+json": {"schema": {"allOf": [
                {"$ref": "#/components/schemas/Problem"},
                {"properties": {"code": {"enum": codes}}}]}}}}


def _hoist_defs(node: Any, defs: dict[str, Any]) -> Any:
    """Move pydantic's ``$defs`` into ``components.schemas`` and point the refs there."""
    if isinstance(node, dict):
        defs.update(node.pop("$defs", {}))
        return {k: ("#/components/schemas/" + v.removeprefix("#/$defs/")
                    if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/")
                    else _hoist_defs(v, defs)) for k, v in node.items()}
    if isinstance(node, list):
        return [_hoist_defs(v, defs) for v in node]
    return node


def _user_id_pattern(schema: dict[str, Any]) -> None:
    from api.schemas import USER_ID_PATTERN

    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["pattern"] = USER_ID_PATTERN


# What a created resource leads to (OpenAPI links): clients and schemathesis's stateful
# phase follow them from the id in the response.
_LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, str]]] = {
    ("post", "/api/v1/generations", "202"): {
        f"Get{name}": (op, "generation_id", "$response.body#/id") for name, op in (
            ("Generation", "get_generation_api_v1_generations__generation_id__get"),
            ("History", "history_api_v1_generations__generation_id__history_get"),
            ("Diagram", "diagram_api_v1_generations__generation_id__diagram_get"),
            ("Selection", "select_sample_api_v1_generations__generation_id__selection_post"),
            ("Regenerate", "regenerate_api_v1_generations__generation_id__regenerate_post"),
            ("Cancel", "cancel_api_v1_generations__generation_id__cancel_post"))},
    ("post", _ACCOUNT + "/grants", "201"): {
        "GetAccount": ("get_account_api_v1_accounts__user_id__get", "user_id",
                       "$response.body#/user_id")},
    ("put", _ACCOUNT, "200"): {
        "GetAccount": ("get_account_api_v1_accounts__user_id__get", "user_id",
                       "$response.body#/user_id")},
}


def _add_links(schema: dict[str, Any]) -> None:
    known = {op.get("operationId") for ops in schema.get("paths", {}).values()
             for op in ops.values()}
    for (method, path, status), links in _LINKS.items():
        response = schema.get("paths", {}).get(path, {}).get(method, {}).get(
            "responses", {}).get(status)
        if response is None:
            continue
        response["links"] = {name: {"operationId": op, "parameters": {param: value}}
                             for name, (op, param, value) in links.items() if op in known}


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Make FastAPI's document tell the truth (in place, idempotent).

    Request bodies read by hand get their model with nested models in ``components``; every
    ``/api/`` operation gets its refusals as ``application/problem+json`` with their codes
    (replacing FastAPI's ``HTTPValidationError``), the Idempotency-Key header where it
    applies, and path ids their limits.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if schema.get("x-aigen-complete"):
        return schema
    defs: dict[str, Any] = {}
    components["Problem"] = PROBLEM_SCHEMA
    components["FieldError"] = FIELD_ERROR_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            if "requestBody" in op:
                op["requestBody"] = _hoist_defs(op["requestBody"], defs)
            if not path.startswith("/api/"):
                continue
            codes = OPERATION_CODES.get((method, path), _DEFAULT_CODES)
            by_status: dict[int, list[str]] = {}
            for code in ("unauthorized", *codes, *_EDGE):
                by_status.setdefault(CODE_STATUS[code], []).append(code)
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status, listed in sorted(by_status.items()):
                responses[str(status)] = _problem_response(listed)
            params = op.setdefault("parameters", [])
            for param in params:
                if param["in"] == "path" and param["name"] == "generation_id":
                    param["description"] = ("A generation id (a UUID). An id longer than 36 "
                                            "characters is 404.")
                if param["name"] == "user_id":
                    param["description"] = ("A user id: 1-64 characters, no control or "
                                            "format characters, not . or .., no / or \\.")
                    _user_id_pattern(param["schema"])
                if param["name"] == "cursor":
                    param["description"] = ("The `next_cursor` of the previous page, as "
                                            "returned; anything else is 422.")
            if (method, path) in IDEMPOTENT:
                required = IDEMPOTENT[(method, path)]
                params.append({
                    "name": "Idempotency-Key", "in": "header", "required": required,
                    "description": "Repeats with the same key and body replay the stored "
                                   "response; another body is 409 `idempotency_key_reused`."
                                   + (" Required here." if required else ""),
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255}})
    for name, definition in defs.items():
        components.setdefault(name, definition)
    _add_links(schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    schema["x-aigen-complete"] = True
    return schema
