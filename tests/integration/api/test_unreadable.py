"""A generation whose stored row no longer loads (a corrupt body): never a 500.

Reading it answers 409 ``generation_unreadable`` with what the row's own columns still say
(state, attention), its history stays readable, a command on it is refused the same way, and
the console says so instead of failing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.app import ApiDeps, create_app
from saga.commands import Park
from tests.conftest import World
from tests.integration.api.helpers import API_KEYS, GENERATIONS, SUP, SVC, grant, start_ok


@pytest.fixture
def lenient(pg_world: World) -> Iterator[TestClient]:
    """The app without re-raising server errors: a 500 is an answer the test can see."""
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries, api_keys=API_KEYS))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def corrupt(world: World, gen_id: str) -> None:
    with world.engine.begin() as conn:
        conn.execute(text("UPDATE generations SET body = '{\"poisoned\": true}'::jsonb "
                          "WHERE id = :id"), {"id": gen_id})


def test_reading_an_unreadable_generation_is_a_409_with_its_attention(
        lenient: TestClient, pg_world: World) -> None:
    grant(lenient)
    gen = start_ok(lenient)
    corrupt(pg_world, gen["id"])
    for headers in (SVC, SUP):
        r = lenient.get(f"{GENERATIONS}/{gen['id']}", headers=headers)
        assert r.status_code == 409, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["code"] == "generation_unreadable"
        assert problem["generation_id"] == gen["id"]
        assert problem["state"] == "processing_samples"
        assert problem["attention"] is None  # not parked yet: nothing has tried to use it
    assert pg_world.bus.handle(Park(gen["id"], "timer", "UnloadableSaga: KeyError")) is True
    parked = lenient.get(f"{GENERATIONS}/{gen['id']}", headers=SVC).json()
    assert parked["attention"]["kind"] == "timer"
    assert parked["attention"]["reason"] == "UnloadableSaga: KeyError"


def test_an_unreadable_generations_history_stays_readable(
        lenient: TestClient, pg_world: World) -> None:
    grant(lenient)
    gen = start_ok(lenient)
    corrupt(pg_world, gen["id"])
    r = lenient.get(f"{GENERATIONS}/{gen['id']}/history", headers=SUP)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "processing_samples"
    assert [e["kind"] for e in r.json()["events"]][:2] == ["transition", "credit"]


def test_a_command_on_an_unreadable_generation_is_refused_not_a_500(
        lenient: TestClient, pg_world: World) -> None:
    grant(lenient)
    gen = start_ok(lenient)
    corrupt(pg_world, gen["id"])
    for path in ("/cancel", "/regenerate", "/selection"):
        body = {"sample_id": "s1"} if path == "/selection" else {}
        r = lenient.post(f"{GENERATIONS}/{gen['id']}{path}", json=body, headers=SVC)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["code"] == "generation_unreadable"


def test_the_console_shows_an_unreadable_generation_instead_of_failing(
        lenient: TestClient, pg_world: World) -> None:
    grant(lenient)
    gen = start_ok(lenient)
    corrupt(pg_world, gen["id"])
    assert pg_world.bus.handle(Park(gen["id"], "timer", "UnloadableSaga: KeyError")) is True
    form = lenient.get("/console/sign-in").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token is not None
    assert lenient.post("/console/sign-in", data={"csrf_token": token.group(1),
                                                  "api_key": "sup-key"},
                        follow_redirects=False).status_code == 303
    r = lenient.get(f"/console/generations/{gen['id']}")
    assert r.status_code == 409, r.text[:500]
    assert "cannot be read" in r.text and "UnloadableSaga: KeyError" in r.text
    assert f"/api/v1/generations/{gen['id']}/support/retry" in r.text  # the id, to paste
