"""REST API (contract §3): thin FastAPI routes that turn requests into saga commands."""
