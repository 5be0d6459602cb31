"""GET /api/v1/state-machine and /generations/{id}/diagram over HTTP, with their refusals."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

from saga.machine import STATES
from saga.model import TERMINAL_STATES as TERMINAL
from tests.browser.conftest import SERVICE_KEY, SUPPORT_KEY, Server
from tests.browser.helpers import start_generation, wait_for_state


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_state_machine_for_both_roles(server: Server) -> None:
    for key in (SERVICE_KEY, SUPPORT_KEY):
        response = server.api.get("/api/v1/state-machine", headers=_auth(key))
        assert response.status_code == 200
        body = response.json()
        assert [s["name"] for s in body["states"]] == STATES
        assert {s["name"] for s in body["states"] if s["terminal"]} == TERMINAL
        assert {"trigger": "select", "source": "awaiting_selection",
                "dest": "processing_final"} in body["transitions"]


def test_the_state_machine_needs_a_key(server: Server) -> None:
    response = server.api.get("/api/v1/state-machine", headers={"Authorization": ""})
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    wrong = server.api.get("/api/v1/state-machine", headers=_auth("nope"))
    assert wrong.status_code == 401


def test_a_generations_diagram_marks_its_state(server: Server) -> None:
    generation_id = start_generation(server, f"u-{uuid.uuid4().hex[:8]}")
    wait_for_state(server, generation_id, "awaiting_selection")
    response = server.support_get(f"/api/v1/generations/{generation_id}/diagram")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(response.text)
    states = {g.get("data-state"): g for g in root.iter("{http://www.w3.org/2000/svg}g")
              if g.get("data-state")}
    assert set(states) == set(STATES)
    assert [n for n, g in states.items() if g.get("aria-current") == "step"] == [
        "awaiting_selection"]


def test_the_diagram_is_for_support_only_and_404_for_unknown_ids(server: Server) -> None:
    generation_id = start_generation(server, f"u-{uuid.uuid4().hex[:8]}")
    forbidden = server.api.get(f"/api/v1/generations/{generation_id}/diagram")
    assert forbidden.status_code == 403
    assert forbidden.json()["code"] == "forbidden"
    missing = server.support_get(f"/api/v1/generations/{uuid.uuid4()}/diagram")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
