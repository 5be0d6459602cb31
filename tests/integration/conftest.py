"""Fixtures for the integration tier: the real service on PostgreSQL and RabbitMQ."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from aigen.bootstrap import build
from persistence.external_billing import ExternalBilling, HttpBillingClient
from standins.billing import BillingStandIn
from tests.conftest import FakeClock, World
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


# -- the external billing stand-in, and a World whose billing is it over HTTP ------------
@pytest.fixture
def billing() -> Iterator[BillingStandIn]:
    with BillingStandIn() as standin:
        yield standin


@pytest.fixture
def ext_world(pg_engine: Engine, clock: FakeClock, billing: BillingStandIn) -> Iterator[World]:
    client = HttpBillingClient(billing.url, timeout=0.5, attempts=3, backoff=0.01)
    world = World(pg_engine, clock, billing_factory=functools.partial(ExternalBilling,
                                                                       client=client))
    yield world
    client.close()
