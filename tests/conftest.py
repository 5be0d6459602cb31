"""Shared fixtures.

Integration fixtures talk to the real PostgreSQL (127.0.0.1:5432) and RabbitMQ
(127.0.0.1:5672). Locally they skip with a clear message when a server is missing; under
``CI=true`` they fail instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import Engine, create_engine, text

from messaging.inprocess import InProcessBroker
from messaging.relay import OutboxRelay
from persistence.db import make_engine, migrate, normalize_url
from persistence.ledger import SqlLedger
from persistence.outbox_store import SqlOutboxStore
from persistence.tables import metadata
from persistence.uow import SqlUnitOfWork
from saga.messagebus import MessageBus
from saga.model import SagaConfig
from saga.observer import NullObserver
from saga.queries import Queries

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("AIGEN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = os.environ.get("AIGEN_TEST_AMQP_HOST", "127.0.0.1:5672")


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI, where every integration test must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: integration tests must not skip)")
    pytest.skip(reason)


# ------------------------------------------------------------------ clock
@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: datetime(2026, 11, 2, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ------------------------------------------------------------------ databases
@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated, dropped afterwards."""
    name = f"aigen_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        unavailable(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    migrate(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def truncate_all(engine: Engine) -> None:
    names = ", ".join(t.name for t in metadata.sorted_tables)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
        else:
            for table in metadata.sorted_tables:
                conn.execute(table.delete())


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=20)
    truncate_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Any) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path}/aigen.db"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


# ------------------------------------------------------------------ RabbitMQ
def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of our own for this session (the contract's names are fixed)."""
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed, cannot create a test vhost")
    vhost = f"aigen-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except Exception as exc:
        unavailable(f"RabbitMQ is not available: {exc}")
    yield vhost
    with contextlib.suppress(Exception):
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def amqp_url(amqp_vhost: str) -> Iterator[str]:
    """The session vhost, emptied of the contract's queues and exchanges before each test."""
    import pika

    url = f"amqp://guest:guest@{AMQP_HOST}/{quote(amqp_vhost, safe='')}"
    from messaging.broker import EXCHANGES, QUEUES

    def clean() -> None:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        for queue, _args, _binds in QUEUES:
            ch.queue_delete(queue)
        for exchange, _kind in EXCHANGES:
            ch.exchange_delete(exchange)
        conn.close()

    try:
        clean()
    except Exception as exc:
        unavailable(f"RabbitMQ is not reachable at {AMQP_HOST}: {exc}")
    yield url
    clean()


# ------------------------------------------------------------------ the saga, wired in-process
TEST_CONFIG = SagaConfig(
    samples_deadline=timedelta(seconds=120),
    final_deadline=timedelta(seconds=600),
    selection_window=timedelta(hours=24),
    max_attempts=3,
    retry_backoff_base=timedelta(seconds=1),
    retry_backoff_max=timedelta(seconds=30),
)


@dataclass
class World:
    """The message bus and queries on a real database with an in-process broker and a manual clock.

    ``pump()`` relays the outbox synchronously; ``jobs()`` returns what n8n would receive.
    """

    engine: Engine
    clock: FakeClock
    config: SagaConfig = TEST_CONFIG
    broker: InProcessBroker = field(
        default_factory=lambda: InProcessBroker(keep_published=True))
    billing_factory: Any = SqlLedger

    def __post_init__(self) -> None:
        def uow() -> SqlUnitOfWork:
            return SqlUnitOfWork(self.engine, self.billing_factory)

        self.bus = MessageBus(uow, self.config, clock=self.clock)
        self.queries = Queries(uow)
        self.relay = OutboxRelay(SqlOutboxStore(self.engine), self.broker, NullObserver())

    def pump(self) -> None:
        while self.relay.run_once():
            pass

    def drain(self, queue: str) -> list[dict[str, Any]]:
        self.pump()
        q = self.broker.queues[queue]
        out = []
        while not q.empty():
            out.append(json.loads(q.get_nowait().body))
        return out

    def jobs(self) -> list[dict[str, Any]]:
        return self.drain("n8n.generation.jobs")

    def published(self, exchange: str) -> list[dict[str, Any]]:
        self.pump()
        return [m.body for m in self.broker.published if m.exchange == exchange]


@pytest.fixture
def world(sqlite_engine: Engine, clock: FakeClock) -> World:
    return World(sqlite_engine, clock)


@pytest.fixture
def pg_world(pg_engine: Engine, clock: FakeClock) -> World:
    return World(pg_engine, clock)
