"""Console sign-in sessions and CSRF tokens.

The session cookie is signed and time-stamped with ``itsdangerous``; it carries a random
session id and a fingerprint of the support key that signed in (never the key). The signing
secret is derived from the configured API keys, so every replica agrees on it without another
setting, and rotating the keys ends every session. A CSRF token is an HMAC of the session id:
tied to one session, checked on every POST (the sign-in form included, via an anonymous
session), and useless to anyone who cannot read the page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "aigen_console"
MAX_AGE_S = 8 * 3600  # a working day; then sign in again
ANONYMOUS_MAX_AGE_S = 3600  # the sign-in form's own session


@dataclass(frozen=True)
class Session:
    sid: str
    key_fingerprint: str | None  # None: not signed in (the sign-in form's session)

    @property
    def signed_in(self) -> bool:
        return self.key_fingerprint is not None


def _fingerprint(key: bytes) -> str:
    return hashlib.sha256(b"aigen console key\0" + key).hexdigest()[:32]


class Sessions:
    def __init__(self, api_keys: dict[str, str]) -> None:
        material = b"\0".join(sorted(f"{role}:{key}".encode() for key, role in api_keys.items()))
        self._secret = hashlib.sha256(b"aigen console session secret\0" + material).digest()
        self._signer = URLSafeTimedSerializer(self._secret, salt="aigen-console-session")
        self._keys = [(key.encode(), role) for key, role in api_keys.items()]
        self._support = {_fingerprint(key.encode())
                         for key, role in api_keys.items() if role == "support"}

    def role_of(self, given: str) -> str | None:
        """The role of an API key, compared in constant time against every key."""
        raw = given.strip().encode()
        role = None
        for key, r in self._keys:
            if hmac.compare_digest(key, raw):
                role = r
        return role

    def new(self, support_key: str | None = None) -> tuple[str, Session]:
        """A fresh session (a new id on every sign-in: no session fixation)."""
        fingerprint = _fingerprint(support_key.strip().encode()) if support_key else None
        session = Session(secrets.token_urlsafe(24), fingerprint)
        return self._signer.dumps({"sid": session.sid, "k": fingerprint}), session

    def load(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            data = self._signer.loads(cookie, max_age=MAX_AGE_S)
        except BadSignature:  # also SignatureExpired
            return None
        if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
            return None
        fingerprint = data.get("k")
        if fingerprint is not None and fingerprint not in self._support:
            return None  # the key it signed in with is no longer a support key
        if fingerprint is None:
            try:
                self._signer.loads(cookie, max_age=ANONYMOUS_MAX_AGE_S)
            except BadSignature:
                return None
        return Session(data["sid"], fingerprint)

    def csrf_token(self, session: Session) -> str:
        return hmac.new(self._secret, b"csrf\0" + session.sid.encode(), "sha256").hexdigest()

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session), token)
