"""REST API (docs/api.md): thin FastAPI routes that turn requests into saga commands."""
