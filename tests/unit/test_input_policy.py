"""The input policy's pure building blocks (``saga.input_policy``) and the list cursor."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import ApiDeps, _decode_cursor, create_app
from tests.conftest import World

SUP = {"Authorization": "Bearer sup-key"}


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# ------------------------------------------------------------------ list cursor
@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    app = create_app(ApiDeps(service=world.service, api_keys={"sup-key": "support"}))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


# Offsets that move a valid timestamp outside datetime's range when turned into UTC.
OUT_OF_RANGE_CURSORS = [
    '["0001-01-01T00:00:00+14:00", "x"]',
    '["9999-12-31T23:59:59-14:00", "x"]',
]


@pytest.mark.parametrize("raw", OUT_OF_RANGE_CURSORS)
def test_cursor_outside_utc_range_is_refused_by_the_decoder(raw: str) -> None:
    with pytest.raises(ValueError):
        _decode_cursor(_b64(raw))


@pytest.mark.parametrize("raw", OUT_OF_RANGE_CURSORS)
def test_cursor_outside_utc_range_is_422_not_500(client: TestClient, raw: str) -> None:
    resp = client.get("/api/v1/generations", params={"cursor": _b64(raw)}, headers=SUP)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["code"] == "validation_error"
    assert [e["field"] for e in problem["errors"]] == ["cursor"]


def test_a_valid_cursor_decodes_to_utc() -> None:
    at, last_id = _decode_cursor(_b64('["2026-11-02T14:00:00+02:00", "g-1"]'))
    assert at.utcoffset() is not None and at.utcoffset().total_seconds() == 0
    assert (at.hour, last_id) == (12, "g-1")
