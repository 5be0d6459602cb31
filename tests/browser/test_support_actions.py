"""Support's actions in real Chromium: cancel, resolve a stuck compensation, replay a dead
letter, and the CSRF check on each action.

The service runs as ``aigen serve`` does (SQLite, in-process broker) but with the external
billing stand-in as its credit backend, so a release can be made to fail, and a slow demo
worker, so a generation stays in ``processing_samples`` with its hold open.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aigen.bootstrap import Runtime, build
from aigen.demo_worker import render_png
from aigen.settings import Settings
from messaging.broker import Delivery
from standins.billing import BillingStandIn
from tests.browser.conftest import SERVICE_KEY, SUPPORT_KEY, _free_port
from tests.browser.helpers import shoot, sign_in

NOTES_SCREENS = Path("/work/wt/notes/screens-h11b")
SUP = {"Authorization": f"Bearer {SUPPORT_KEY}"}


@dataclass
class Stack:
    url: str
    api: httpx.Client
    runtime: Runtime
    billing: BillingStandIn


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import uvicorn

    with BillingStandIn() as billing:
        port = _free_port()
        settings = Settings(data_dir=tmp_path_factory.mktemp("console-support"),
                            http_port=port, demo_delay_s=600, amqp_url=None, database_url="",
                            api_keys=None, billing_url=billing.url, billing_timeout_s=0.5)
        runtime = build(settings)
        runtime.start()
        uv = uvicorn.Server(uvicorn.Config(runtime.app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {SERVICE_KEY}"},
                           timeout=10)
        try:
            yield Stack(url, api, runtime, billing)
        finally:
            api.close()
            uv.should_exit = True
            thread.join(timeout=10)
            runtime.stop()


def _start(stack: Stack) -> str:
    user = f"u-{uuid.uuid4().hex[:8]}"
    stack.billing.open_account(user, "free", "20.00")
    resp = stack.api.post("/api/v1/generations", headers={"Idempotency-Key": str(uuid.uuid4())},
                          json={"user_id": user, "prompt": "winter sale, snowy shop window",
                                "format": "instagram_post"})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _state(stack: Stack, generation_id: str) -> str:
    return str(stack.api.get(f"/api/v1/generations/{generation_id}").json()["state"])


def _wait(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _shoot(page: Any, folder: Path, name: str) -> None:
    shoot(page, folder, name)
    if NOTES_SCREENS.parent.is_dir() and folder.resolve() != NOTES_SCREENS.resolve():
        NOTES_SCREENS.mkdir(exist_ok=True)
        shutil.copy(folder / f"{name}.png", NOTES_SCREENS / f"{name}.png")


def _act(page: Any, label: str, reason: str) -> None:
    page.get_by_text(label, exact=True).click()
    form = page.locator("details.action[open] form")
    form.get_by_label("Reason").fill(reason)
    form.get_by_role("button", name="Confirm").click()
    page.wait_for_load_state()


def test_cancel_a_generation_with_a_reason_and_see_the_timeline(
        page: Any, stack: Stack, screenshot_dir: Path) -> None:
    generation_id = _start(stack)
    sign_in(page, stack)  # type: ignore[arg-type]
    page.goto(f"{stack.url}/console/generations/{generation_id}")
    _act(page, "Cancel generation", "customer called: wrong brand colours")
    assert page.get_by_text("Done: cancelled").is_visible()
    assert _state(stack, generation_id) == "cancelled"
    current = page.locator('.diagram svg [aria-current="step"]')
    assert current.get_attribute("data-state") == "cancelled"
    timeline = page.locator("ol.timeline")
    assert timeline.get_by_text(re.compile("customer called: wrong brand colours")).count() >= 1
    assert page.get_by_text("Cancel generation", exact=True).count() == 0  # terminal now
    _shoot(page, screenshot_dir, "h11b-02-generation-cancelled")


def test_resolve_a_stuck_compensation_with_the_external_billing_stand_in(
        page: Any, stack: Stack, screenshot_dir: Path) -> None:
    generation_id = _start(stack)
    stack.billing.down = True
    try:
        cancelled = stack.api.post(f"/api/v1/generations/{generation_id}/cancel", json={})
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "compensating"
        sign_in(page, stack)  # type: ignore[arg-type]
        page.goto(f"{stack.url}/console/generations/{generation_id}")
        assert page.locator('.diagram svg [aria-current="step"]').get_attribute(
            "data-state") == "compensating"
        # Already headed for cancelled: cancelling again is not offered.
        assert page.get_by_text("Cancel generation", exact=True).count() == 0
        page.get_by_text("Resolve hold", exact=True).click()
        form = page.locator("details.action[open] form")
        form.get_by_label("released").check()
        form.get_by_label("Reason").fill("released by hand in billing, ticket 7")
        _shoot(page, screenshot_dir, "h11b-03-resolve-form")
        form.get_by_role("button", name="Confirm").click()
        page.wait_for_load_state()
        # Billing is still down: had resolve asked it, the action would have failed.
        assert page.get_by_text("Done: resolved").is_visible()
        assert _state(stack, generation_id) == "cancelled"
        # The compensation's retry timer is cleared: billing is never asked again. (Before
        # the resolve, the sweeper may still have been retrying the release concurrently.)
        calls = stack.billing.calls
        time.sleep(1.5)
        assert stack.billing.calls == calls
        view = stack.api.get(f"/api/v1/generations/{generation_id}").json()
        assert view["credits"]["held"] == "0.00" and view["credits"]["released"] != "0.00"
        assert page.get_by_text("Resolve hold", exact=True).count() == 0
    finally:
        stack.billing.down = False


def test_replay_a_dead_letter_and_see_it_applied(page: Any, stack: Stack,
                                                 screenshot_dir: Path) -> None:
    generation_id = _start(stack)
    events = stack.api.get(f"/api/v1/generations/{generation_id}/history",
                           headers=SUP).json()["events"]
    job_id = next(e["detail"]["job_id"] for e in events
                  if e["kind"] == "message_out" and "job_id" in e["detail"])
    assets = stack.runtime.settings.data_dir / "assets"
    for i in (1, 2):  # what n8n would have stored, served by the embedded mode's /assets
        render_png(assets / f"replay/{job_id}/s{i}.png", 256, 256, "winter sale",
                   f"{job_id}/s{i}", f"s{i}")
    body = json.dumps({"event_type": "AIGenerationSamplesReady",
                       "generation_id": generation_id, "job_id": job_id,
                       "samples": [{"sample_id": f"s{i}",
                                    "url": f"{stack.url}/assets/replay/{job_id}/s{i}.png",
                                    "width": 256, "height": 256} for i in (1, 2)]}).encode()
    # A valid result that a failure in processing dead-lettered.
    stack.runtime.broker.dead_letter(Delivery(body, "generation.result.samples_ready",
                                              str(uuid.uuid4())), "processing_error: forced")
    sign_in(page, stack)  # type: ignore[arg-type]

    def listed() -> bool:
        page.goto(f"{stack.url}/console/dead-letters")
        return page.get_by_text("processing_error: forced").count() > 0
    _wait(listed)
    item = page.locator("ul.letters li", has_text=generation_id[:8])
    assert item.get_by_text("generation.result.samples_ready").count() == 1
    _shoot(page, screenshot_dir, "h11b-04-dead-letters")
    item.get_by_text("Replay", exact=True).click()
    item.get_by_label("Reason").first.fill("processing bug fixed")
    item.locator("form[action$='/replay']").get_by_role("button", name="Confirm").click()
    page.wait_for_load_state()
    assert page.get_by_text("Dead letter replayed").is_visible()
    _wait(lambda: _state(stack, generation_id) == "awaiting_selection")
    page.goto(f"{stack.url}/console/generations/{generation_id}")
    timeline = page.locator("ol.timeline")
    assert timeline.get_by_text(re.compile(
        r"support replayed a dead letter \(reason: processing bug fixed\)")).is_visible()
    assert timeline.get_by_text(re.compile("dead-lettered: processing_error")).is_visible()
    assert page.locator(".assets img").count() == 2
    assert timeline.get_by_text(re.compile(r"n8n delivered 2 samples")).is_visible()
    _shoot(page, screenshot_dir, "h11b-05-generation-after-replay")


def test_support_actions_refuse_a_post_without_the_csrf_token(
        page: Any, stack: Stack, screenshot_dir: Path) -> None:
    generation_id = _start(stack)
    sign_in(page, stack)  # type: ignore[arg-type]
    page.goto(f"{stack.url}/console/generations/{generation_id}")
    for action, form in (("cancel", {"reason": "x"}),
                         ("resolve", {"reason": "x", "hold_id": "h", "outcome": "released"})):
        response = page.request.post(
            f"{stack.url}/console/generations/{generation_id}/{action}", form=form)
        assert response.status == 403, action
    for action in ("replay", "discard"):
        response = page.request.post(f"{stack.url}/console/dead-letters/{uuid.uuid4()}/{action}",
                                     form={"reason": "x"})
        assert response.status == 403, action
    # In the browser: the cancel form with its token removed.
    page.get_by_text("Cancel generation", exact=True).click()
    page.get_by_label("Reason").fill("no token")
    page.evaluate("document.querySelector('form[action$=\"/cancel\"] "
                  "input[name=csrf_token]').remove()")
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_load_state()
    assert page.get_by_role("heading", name="Refused").is_visible()
    assert _state(stack, generation_id) == "processing_samples"
    # The list, now that the tests above left generations in several states.
    page.goto(f"{stack.url}/console/")
    _shoot(page, screenshot_dir, "h11b-01-generations")
