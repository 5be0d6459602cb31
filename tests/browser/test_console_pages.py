"""The console's slots for data the service does not produce yet (parked sagas, dead letters,
stuck compensations, s3 URLs) render once the data adapter returns it. Server-side only."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from api.app import ApiDeps, create_app
from api.console import actions, data

KEYS = {"svc-key": "service", "sup-key": "support"}
GEN_ID = "0b0e6d5c-1111-4222-8333-444455556666"
GENERATION = {
    "id": GEN_ID, "state": "compensating", "user_id": "u-7", "project_id": None,
    "prompt": "poster", "format": {"name": "custom", "width": 800, "height": 600},
    "sample_count": 2,
    "samples": [{"sample_id": "s1", "url": "s3://bucket/u-7/s1.png"},
                {"sample_id": "s2", "url": "https://cdn.example/s2.png"}],
    "selected_sample_id": None, "final_asset": None,
    "credits": {"held": "0.25", "charged": "0.00", "released": "0.00"},
    "error": {"code": "billing_unavailable", "message": "billing did not answer"},
    "attempt": 1, "deadline_at": None, "created_at": "2026-12-01T10:00:00Z",
    "updated_at": "2026-12-01T10:02:00Z", "metadata": {},
    "attention": {"reason": "release kept failing", "since": "2026-12-01T10:05:00Z",
                  "kind": "compensation"},
}
HOLD = {"hold_id": "h-1", "generation_id": GEN_ID, "stage": "samples", "amount": "0.25",
        "status": "open", "created_at": "2026-12-01T10:00:00Z", "settled_at": None}


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setattr(data, "generation", lambda _s, _id, _links=None: GENERATION)
    monkeypatch.setattr(data, "history", lambda _s, _id: {"id": GEN_ID, "state": "compensating",
                                                          "events": []})
    monkeypatch.setattr(data, "open_holds", lambda _s, **_kw: [HOLD])
    monkeypatch.setattr(data, "search_generations", lambda _s, **_kw: data.Page([], None))
    monkeypatch.setattr(data, "state_counts", lambda _s: dict.fromkeys(data.STATES, 0))
    monkeypatch.setattr(data, "attention", lambda _s: data.Attention(True, [{
        "generation_id": GEN_ID, "user_id": "u-7", "state": "compensating",
        "attention": GENERATION["attention"]}]))
    monkeypatch.setattr(data, "dead_letters", lambda _s: data.DeadLetters(True, [{
        "id": "dl-9", "dead_lettered_at": "2026-12-01T09:00:00Z", "reason": "schema",
        "routing_key": "generation.result.samples", "generation_id": None,
        "body_preview": '{"broken": '}]))
    app = create_app(ApiDeps(bus=object(), queries=object(), api_keys=KEYS))  # type: ignore[arg-type]
    with TestClient(app) as c:
        form = c.get("/console/sign-in").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert token is not None
        signed = c.post("/console/sign-in", data={"csrf_token": token.group(1),
                                                  "api_key": "sup-key"},
                        follow_redirects=False)
        assert signed.status_code == 303
        yield c


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_the_attention_list_shows_parked_sagas(client: TestClient) -> None:
    html = client.get("/console/").text
    assert "release kept failing" in html
    assert f'href="/console/generations/{GEN_ID}"' in html
    assert "not available in this version" not in html


def test_a_stuck_compensation_offers_resolve_and_retry_and_cancel(client: TestClient) -> None:
    html = client.get(f"/console/generations/{GEN_ID}").text
    for label in ("Resolve hold", "Retry now", "Cancel generation"):
        assert f'<summary class="button">{label}</summary>' in html
    assert '<option value="h-1">' in html
    assert 'value="released"' in html and 'value="committed"' in html
    assert html.count(">Confirm</button>") == 3
    assert html.count(">Reason</label>") == 3
    # s3:// is shown as text, https:// as an image.
    assert '<img src="https://cdn.example/s2.png"' in html
    assert "s3://bucket/u-7/s1.png" in html and '<img src="s3://' not in html
    assert "billing did not answer" in html


def test_resolve_checks_its_form_before_the_adapter(client: TestClient,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(actions, "resolve", lambda _d, *args: calls.append(args))
    token = _token(client.get(f"/console/generations/{GEN_ID}").text)
    path = f"/console/generations/{GEN_ID}/resolve"
    no_reason = client.post(path, data={"csrf_token": token, "hold_id": "h-1",
                                        "outcome": "released", "reason": " "})
    assert no_reason.status_code == 422
    bad_outcome = client.post(path, data={"csrf_token": token, "hold_id": "h-1",
                                          "outcome": "maybe", "reason": "checked"})
    assert bad_outcome.status_code == 422
    valid = client.post(path, data={"csrf_token": token, "hold_id": "h-1",
                                    "outcome": "released", "reason": "checked billing"},
                        follow_redirects=False)
    assert valid.status_code == 303  # back to the generation's page
    assert calls == [(GEN_ID, "checked billing", "h-1", "released")]  # only the valid form


def test_dead_letters_list_with_replay_and_discard(client: TestClient,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(actions, "replay_dead_letter", lambda _d, *args: calls.append(args))
    html = client.get("/console/dead-letters").text
    assert "generation.result.samples" in html and "{&#34;broken&#34;: " in html
    assert 'action="/console/dead-letters/dl-9/replay"' in html
    assert 'action="/console/dead-letters/dl-9/discard"' in html
    token = _token(html)
    refused = client.post("/console/dead-letters/dl-9/replay", data={"reason": "fixed"})
    assert refused.status_code == 403
    answered = client.post("/console/dead-letters/dl-9/replay",
                           data={"csrf_token": token, "reason": "fixed"}, follow_redirects=False)
    assert answered.status_code == 303
    assert calls == [("dl-9", "fixed")]  # the refused POST never reached the action


def test_pages_are_sent_with_a_strict_content_security_policy(client: TestClient) -> None:
    response = client.get("/console/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    assert client.get("/console/static/console.css").headers["content-type"].startswith(
        "text/css")
    assert client.get("/console/static/views.py").status_code == 404


class _RecordingService:
    def __init__(self, items: list[dict[str, object]], more: bool) -> None:
        self.items, self.more = items, more
        self.calls: list[dict[str, object]] = []

    def list_generations(self, **kwargs: object) -> tuple[list[dict[str, object]], object]:
        self.calls.append(kwargs)
        cursor = (datetime(2026, 12, 1, 9, 0, tzinfo=UTC), "z") if self.more else None
        return self.items, cursor


def test_the_time_range_bounds_the_search() -> None:
    items = [{"id": "b", "created_at": "2026-12-01T11:00:00Z"},
             {"id": "a", "created_at": "2026-12-01T09:30:00Z"}]
    service = _RecordingService(items, more=True)
    until = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    since = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    page = data.search_generations(service, until=until, since=since)  # type: ignore[arg-type]
    after = service.calls[0]["after"]
    assert isinstance(after, tuple) and after[0] > until  # "To" is inclusive
    assert [g["id"] for g in page.items] == ["b"]
    assert page.next_cursor is None  # older than "From": no further pages

    service = _RecordingService(items, more=True)
    page = data.search_generations(service)  # type: ignore[arg-type]
    assert page.next_cursor is not None
    assert data.decode_cursor(page.next_cursor) == (datetime(2026, 12, 1, 9, 0, tzinfo=UTC), "z")
    with pytest.raises(data.BadCursor):
        data.decode_cursor("not-a-cursor")
