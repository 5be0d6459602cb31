"""Console sessions: signed, expiring, tied to a support key; CSRF tokens tied to a session."""

from __future__ import annotations

import time

import pytest

from api.console.session import ANONYMOUS_MAX_AGE_S, MAX_AGE_S, Sessions

KEYS = {"svc": "service", "sup": "support"}


def test_only_support_keys_make_a_signed_in_session() -> None:
    sessions = Sessions(KEYS)
    assert sessions.role_of("sup") == "support"
    assert sessions.role_of("svc") == "service"
    assert sessions.role_of("nope") is None
    cookie, session = sessions.new("sup")
    loaded = sessions.load(cookie)
    assert loaded == session and loaded.signed_in
    assert "sup" not in cookie  # a fingerprint, never the key


def test_a_cookie_expires_and_survives_no_key_change(monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = Sessions(KEYS)
    cookie, _ = sessions.new("sup")
    anonymous, _ = sessions.new()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + ANONYMOUS_MAX_AGE_S + 5)
    assert sessions.load(cookie) is not None
    assert sessions.load(anonymous) is None  # the sign-in form's session is short-lived
    monkeypatch.setattr(time, "time", lambda: now + MAX_AGE_S + 5)
    assert sessions.load(cookie) is None
    monkeypatch.undo()
    assert Sessions({"svc": "service", "other": "support"}).load(cookie) is None
    assert Sessions(KEYS).load(cookie) is not None  # another replica, same keys


def test_csrf_tokens_belong_to_one_session() -> None:
    sessions = Sessions(KEYS)
    _, one = sessions.new("sup")
    _, two = sessions.new("sup")
    assert sessions.csrf_ok(one, sessions.csrf_token(one))
    assert not sessions.csrf_ok(one, sessions.csrf_token(two))
    assert not sessions.csrf_ok(one, "")
    assert not sessions.csrf_ok(None, sessions.csrf_token(one))
