"""Engine creation: URL normalisation, SQLite tuning, schema migration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from persistence.sql import json_dumps, json_loads
from saga.retry import register_transient

# The database unreachable or restarting: retried within the budget (saga/retry.py).
register_transient(OperationalError, DisconnectionError, InterfaceError)


def normalize_url(url: str) -> str:
    """Map plain ``postgresql://`` (and ``postgres://``) to the psycopg2 driver.

    SQLAlchemy 2.1 maps the bare scheme to psycopg 3, which this project does not install.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def make_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size, max_overflow=pool_size,
            json_serializer=json_dumps, json_deserializer=json_loads,
        )
        _tune_sqlite(engine)
        return engine
    # No pre-ping: it costs a round trip per transaction. After a database restart the first
    # use of a stale connection fails (API: 503, consumer: redelivery) and the pool recovers.
    # The pool should hold a connection for every thread that uses one at the same time:
    # overflow connections are opened and closed again (a backend fork and an
    # authentication each), so they are a safety margin, not the working set.
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size,
                              "pool_recycle": 1800, "json_serializer": json_dumps,
                              "json_deserializer": json_loads}
    return create_engine(url, echo=echo, **kwargs)


def _tune_sqlite(engine: Engine) -> None:
    """WAL for concurrent readers, and ``BEGIN IMMEDIATE`` so writers queue up.

    pysqlite's default deferred transactions let two writers both read and then deadlock when
    upgrading their locks (SQLITE_BUSY without waiting); taking the write lock up front makes
    the busy timeout apply instead.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(url: str) -> None:
    """Bring the schema up to date (``alembic upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    here = Path(__file__).parent
    cfg = Config()
    cfg.set_main_option("script_location", str(here / "migrations"))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    command.upgrade(cfg, "head")
