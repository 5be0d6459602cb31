# aigen-orchestrator image: `aigen serve` (default) or `aigen migrate`.
# Base pinned to an exact patch tag; pin the digest too in your registry mirror
# (FROM python:3.11.11-slim-bookworm@sha256:...) - it cannot be resolved on the offline build
# machine this file was written on.
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/aigen
COPY pyproject.toml README.md ./
COPY saga saga
COPY api api
COPY messaging messaging
COPY persistence persistence
COPY aigen aigen
# Every dependency ships a wheel (psycopg2-binary, pillow, ...): no compiler is needed. pip and
# setuptools are removed from the runtime venv so the final image carries no build tooling.
# The s3 extra (botocore) signs download links for a real n8n's s3:// assets (AIGEN_S3_*).
RUN /opt/aigen/bin/pip install ".[s3]" \
    && /opt/aigen/bin/pip uninstall -y pip setuptools

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/aigen/bin:$PATH \
    AIGEN_HTTP_HOST=0.0.0.0 AIGEN_DATA_DIR=/tmp/aigen
# The base image's own pip/setuptools/wheel are build tools too; the service runs from /opt/aigen.
RUN python -m pip uninstall -y pip setuptools wheel \
    && groupadd --system --gid 10001 aigen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent aigen
COPY --from=build /opt/aigen /opt/aigen
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["python", "-c", \
    "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2).status != 200)"]
# Exec form: `aigen serve` is PID 1 and receives SIGTERM itself (see README, "Run the full stack").
CMD ["aigen", "serve"]
