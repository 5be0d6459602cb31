"""Scratch PostgreSQL databases and RabbitMQ vhosts for the benchmark and fault-injection runs."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import httpx
from sqlalchemy import create_engine, text

from persistence.db import migrate, normalize_url

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_HOST = "127.0.0.1:5672"


@contextmanager
def scratch_backends(prefix: str, pg: str = DEFAULT_PG,
                     amqp_host: str = DEFAULT_AMQP_HOST, *,
                     migrate_schema: bool = True) -> Iterator[tuple[str, str]]:
    """A migrated database and an empty vhost of their own: (database URL, AMQP URL).

    Both are dropped afterwards, whatever happened. With ``migrate_schema=False`` the
    database is left empty for the caller to migrate (e.g. with another checkout's code).
    """
    tag = uuid.uuid4().hex[:6]
    db, vhost = f"aigen_{prefix}_{tag}", f"aigen-{prefix}-{tag}"
    admin = create_engine(normalize_url(pg), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    try:
        db_url = pg.rsplit("/", 1)[0] + "/" + db
        if migrate_schema:
            migrate(db_url)
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*",
                        ".*", ".*"], check=True)
        yield db_url, f"amqp://guest:guest@{amqp_host}/{quote(vhost, safe='')}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False,
                       capture_output=True)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def wait_ready(base: str, timeout: float = 60) -> None:
    """Wait until ``base``/health/ready answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{base} did not become ready within {timeout}s")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it), for a service to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
