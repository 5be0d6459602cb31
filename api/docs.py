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
        return JSONResponse(with_bearer(app.openapi()))


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
