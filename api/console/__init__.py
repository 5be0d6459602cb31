"""The support console at ``/console/``: server-rendered pages for support staff."""

from api.console.views import console_router

__all__ = ["console_router"]
