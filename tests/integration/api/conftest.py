"""The API test client on the real message bus and PostgreSQL (``pg_world``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import ApiDeps, create_app
from tests.conftest import World
from tests.integration.api.helpers import API_KEYS


@pytest.fixture
def client(pg_world: World) -> Iterator[TestClient]:
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS))
    with TestClient(app) as test_client:
        yield test_client

