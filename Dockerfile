FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    AIGEN_HTTP_HOST=0.0.0.0 AIGEN_DATA_DIR=/var/lib/aigen
WORKDIR /app
COPY pyproject.toml README.md ./
COPY saga saga
COPY api api
COPY messaging messaging
COPY persistence persistence
COPY aigen aigen
RUN pip install --no-cache-dir . && useradd --system --create-home aigen \
    && mkdir -p /var/lib/aigen && chown aigen /var/lib/aigen
USER aigen
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c \
    "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live').status != 200)"
CMD ["aigen", "serve"]
