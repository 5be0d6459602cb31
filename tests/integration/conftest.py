"""Fixtures for the integration tier: the real service on PostgreSQL and RabbitMQ."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from aigen.bootstrap import build
from tests.integration.rabbit_fixtures import Running, settings_for


@pytest.fixture
def running(pg_engine: Engine, pg_url: str, amqp_url: str) -> Iterator[Running]:
    runtime = build(settings_for(pg_url, amqp_url), run_migrations=False)
    runtime.start()
    with TestClient(runtime.app) as client:
        yield Running(runtime, client, pg_engine)
    runtime.stop()


@pytest.fixture
def running_with(pg_engine: Engine, pg_url: str, amqp_url: str) -> Iterator[Any]:
    """Like ``running``, with settings overridden: ``running_with(samples_deadline_s=1)``."""
    started: list[tuple[Any, TestClient]] = []

    def make(**overrides: Any) -> Running:
        runtime = build(settings_for(pg_url, amqp_url, **overrides), run_migrations=False)
        runtime.start()
        client = TestClient(runtime.app)
        client.__enter__()
        started.append((runtime, client))
        return Running(runtime, client, pg_engine)

    yield make
    for runtime, client in started:
        client.__exit__(None, None, None)
        runtime.stop()
