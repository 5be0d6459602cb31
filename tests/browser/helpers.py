"""Shared steps for the browser tests."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from tests.browser.conftest import SUPPORT_KEY, Server


def start_generation(server: Server, user_id: str, prompt: str = "spring sale banner") -> str:
    assert server.api.put(f"/api/v1/accounts/{user_id}", json={"plan": "free"}).status_code == 200
    granted = server.api.post(f"/api/v1/accounts/{user_id}/grants",
                              json={"amount": "5.00", "reason": "browser test"})
    assert granted.status_code == 201, granted.text
    started = server.api.post("/api/v1/generations", headers={"Idempotency-Key": str(uuid.uuid4())},
                              json={"user_id": user_id, "prompt": prompt,
                                    "format": "instagram_post"})
    assert started.status_code == 202, started.text
    return str(started.json()["id"])


def wait_for_state(server: Server, generation_id: str, state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = server.api.get(f"/api/v1/generations/{generation_id}").json()["state"]
        if seen == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"generation {generation_id} stayed {seen!r}, expected {state!r}")


def sign_in(page: Any, server: Server, key: str = SUPPORT_KEY) -> None:
    page.goto(f"{server.url}/console/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def shoot(page: Any, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
