"""The support console in real Chromium: sign-in, search, the diagram, refusals, sign-out."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

from tests.browser.conftest import SERVICE_KEY, Server
from tests.browser.helpers import shoot, sign_in, start_generation, wait_for_state


def test_sign_in_find_a_generation_by_user_and_see_it_on_the_diagram(
        page: Any, phone: Any, server: Server, screenshot_dir: Path) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    generation_id = start_generation(server, user, "autumn coffee promo, warm tones")
    start_generation(server, f"other-{uuid.uuid4().hex[:6]}")  # must not show up in the search
    wait_for_state(server, generation_id, "awaiting_selection")

    page.goto(f"{server.url}/console/")
    assert page.url.endswith("/console/sign-in")
    shoot(page, screenshot_dir, "01-sign-in")
    sign_in(page, server)
    assert page.get_by_role("heading", name="Generations", exact=True).is_visible()

    page.get_by_label("User id").fill(user)
    page.get_by_role("button", name="Search").click()
    page.wait_for_load_state()
    rows = page.locator("table.results tbody tr")
    assert rows.count() == 1
    assert user in rows.first.inner_text()
    assert page.locator(".counts").get_by_text(re.compile("awaiting selection")).is_visible()
    shoot(page, screenshot_dir, "02-generations")

    rows.first.get_by_role("link", name=re.compile(generation_id[:8])).click()
    page.wait_for_load_state()
    assert generation_id in page.locator("h1").inner_text()
    diagram = page.locator(".diagram svg")
    current = diagram.locator('[aria-current="step"]')
    assert current.count() == 1
    assert current.get_attribute("data-state") == "awaiting_selection"
    assert diagram.locator("[data-state]").count() == 10
    # The path it took is marked: requested -> processing_samples -> awaiting_selection.
    taken = diagram.locator(".edge.taken")
    assert sorted((e.get_attribute("data-source"), e.get_attribute("data-dest"))
                  for e in taken.all()) == [("processing_samples", "awaiting_selection"),
                                            ("requested", "processing_samples")]
    assert diagram.locator('.state.taken[data-state="cancelled"]').count() == 0
    timeline = page.locator("ol.timeline")
    assert timeline.get_by_text("held 0.25 for the samples round").is_visible()
    assert timeline.get_by_text(re.compile(r"n8n delivered \d+ samples")).is_visible()
    raw = timeline.locator("details.raw").first
    raw.locator("summary").click()
    assert '"kind": "transition"' in raw.locator("pre").inner_text()
    assert page.locator(".assets img").count() >= 1
    assert page.get_by_text("Cancel generation").is_visible()
    assert page.get_by_text("Retry now").count() == 0  # nothing is parked
    assert page.get_by_text("Resolve hold").count() == 0  # nothing is stuck in compensating
    shoot(page, screenshot_dir, "03-generation")

    page.get_by_text("Cancel generation").click()
    assert page.get_by_label("Reason").is_visible()
    shoot(page, screenshot_dir, "04-generation-cancel-form")

    page.locator(".lead").get_by_role("link", name=user).click()
    page.wait_for_load_state()
    assert page.get_by_role("heading", name=f"Account {user}").is_visible()
    assert page.locator("#journal-h + div table tbody tr").count() >= 2  # grant and the hold
    shoot(page, screenshot_dir, "05-account")

    page.get_by_role("link", name="Dead letters").click()
    page.wait_for_load_state()
    assert page.get_by_role("heading", name="Dead letters").is_visible()
    shoot(page, screenshot_dir, "06-dead-letters")

    # The same pages on a phone-sized screen.
    sign_in(phone, server)
    phone.goto(f"{server.url}/console/?user_id={user}")
    shoot(phone, screenshot_dir, "07-phone-generations")
    phone.goto(f"{server.url}/console/generations/{generation_id}")
    assert phone.locator('.diagram [aria-current="step"]').get_attribute(
        "data-state") == "awaiting_selection"
    shoot(phone, screenshot_dir, "08-phone-generation")


def test_the_session_cookie_is_signed_http_only_strict_and_expires(
        page: Any, server: Server) -> None:
    sign_in(page, server)
    cookies = [c for c in page.context.cookies() if c["name"] == "aigen_console"]
    assert len(cookies) == 1
    cookie = cookies[0]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console"
    assert time.time() + 3600 < cookie["expires"] <= time.time() + 8 * 3600 + 60
    assert page.evaluate("document.cookie") == ""  # scripts cannot read it
    # A tampered cookie is not a session.
    page.context.clear_cookies()
    page.context.add_cookies([{**cookie, "value": cookie["value"][:-2] + "xx"}])
    page.goto(f"{server.url}/console/")
    assert page.url.endswith("/console/sign-in")


def test_wrong_keys_and_the_service_key_are_refused(
        page: Any, server: Server, screenshot_dir: Path) -> None:
    sign_in(page, server, "not-a-key")
    assert page.url.endswith("/console/sign-in")
    assert "not valid" in page.get_by_role("alert").inner_text()
    shoot(page, screenshot_dir, "09-sign-in-refused")

    sign_in(page, server, SERVICE_KEY)
    assert "support key" in page.get_by_role("alert").inner_text()
    page.goto(f"{server.url}/console/")
    assert page.url.endswith("/console/sign-in")  # still signed out
    page.goto(f"{server.url}/console/dead-letters")
    assert page.url.endswith("/console/sign-in")


def test_a_post_without_the_sessions_csrf_token_is_refused(
        page: Any, browser: Any, server: Server, screenshot_dir: Path) -> None:
    generation_id = start_generation(server, f"u-{uuid.uuid4().hex[:8]}")
    sign_in(page, server)
    page.goto(f"{server.url}/console/generations/{generation_id}")

    # The form with its token removed.
    page.get_by_text("Cancel generation").click()
    page.get_by_label("Reason").fill("customer asked")
    page.evaluate("document.querySelector('form[action$=\"/cancel\"] "
                  "input[name=csrf_token]').remove()")
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_load_state()
    assert page.get_by_role("heading", name="Refused").is_visible()
    shoot(page, screenshot_dir, "10-csrf-refused")

    # A token of another session is not this session's token.
    other = browser.new_context()
    other_tab = other.new_page()
    other_tab.goto(f"{server.url}/console/sign-in")
    foreign = other_tab.locator("input[name=csrf_token]").get_attribute("value")
    other.close()
    page.goto(f"{server.url}/console/generations/{generation_id}")
    response = page.request.post(f"{server.url}/console/generations/{generation_id}/cancel",
                                 form={"csrf_token": foreign, "reason": "x"})
    assert response.status == 403

    # Signing out needs the token too.
    response = page.request.post(f"{server.url}/console/sign-out", form={})
    assert response.status == 403

    # None of the refused POSTs changed anything.
    state = server.api.get(f"/api/v1/generations/{generation_id}").json()["state"]
    assert state != "cancelled"


def test_sign_out_ends_the_session(page: Any, server: Server) -> None:
    sign_in(page, server)
    assert page.get_by_role("heading", name="Generations", exact=True).is_visible()
    [signed_in] = [c["value"] for c in page.context.cookies() if c["name"] == "aigen_console"]
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_load_state()
    assert page.url.endswith("/console/sign-in")
    # The sign-in form has an anonymous session of its own; the signed-in one is gone.
    assert signed_in not in [c["value"] for c in page.context.cookies()]
    page.goto(f"{server.url}/console/")
    assert page.url.endswith("/console/sign-in")


def test_keyboard_only_sign_in_and_opening_an_action(page: Any, server: Server) -> None:
    generation_id = start_generation(server, f"u-{uuid.uuid4().hex[:8]}")
    page.goto(f"{server.url}/console/sign-in")
    assert page.evaluate("document.activeElement.id") == "api-key"  # focused on arrival
    page.keyboard.type("dev-support-key")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server.url}/console/")
    assert page.get_by_role("heading", name="Generations", exact=True).is_visible()

    page.goto(f"{server.url}/console/generations/{generation_id}")
    page.locator("summary", has_text="Cancel generation").focus()
    page.keyboard.press("Enter")
    # The opened form puts the cursor in its Reason field.
    page.wait_for_function("document.activeElement && "
                           "document.activeElement.id === 'cancel-reason'")
    page.keyboard.type("typed without a mouse")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Confirm"


def test_a_completed_generation_shows_its_final_asset_and_offers_no_action(
        page: Any, server: Server, screenshot_dir: Path) -> None:
    generation_id = start_generation(server, f"u-{uuid.uuid4().hex[:8]}", "winter sale")
    wait_for_state(server, generation_id, "awaiting_selection")
    chosen = server.api.post(f"/api/v1/generations/{generation_id}/selection",
                             json={"sample_id": "s2"})
    assert chosen.status_code == 202, chosen.text
    wait_for_state(server, generation_id, "completed")
    sign_in(page, server)
    page.goto(f"{server.url}/console/generations/{generation_id}")
    assert page.locator('.diagram [aria-current="step"]').get_attribute(
        "data-state") == "completed"
    final = page.get_by_role("img", name="Final asset")
    final.wait_for()
    assert page.evaluate("(img) => img.complete && img.naturalWidth > 0",
                         final.element_handle())
    assert page.get_by_text("s2 (selected)").is_visible()
    assert page.get_by_text("No action applies").is_visible()
    assert page.get_by_text("Cancel generation").count() == 0
    shoot(page, screenshot_dir, "11-generation-completed")
