"""The URL checks of :mod:`saga.input_policy` as they were before their decisions were cached.

A verbatim copy of the uncached ``_parse_url`` (a URL parsed whole, by ``urlsplit`` and by
ada, on every call) and of the two public checks, kept only as the oracle of
``test_url_policy_cache.py``: the cached path must answer exactly what this one answers.
The tables and the host rules (``_host_reason``, ``_bucket_reason``) are the module's own;
only the parsing and the routing to them is copied.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import ada_url

from saga.input_policy import (
    _HOST_NAME_CHARS,
    _IPV6_LITERAL,
    _PORT,
    _SCHEME,
    MAX_URL_LENGTH,
    ODOO_URL_SCHEMES,
    _allow_key,
    _bucket_reason,
    _host_reason,
    _unsafe_char,
    _Url,
)


def parse_url(url: object, schemes: Iterable[str]) -> _Url | str:
    if not isinstance(url, str):
        return "must be a string"
    if len(url) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    unsafe = _unsafe_char(url)
    if unsafe is not None:
        return unsafe
    allowed = sorted(schemes)
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group()[:-1].lower() if scheme_match else ""
    if scheme not in allowed:
        shown = f"scheme {scheme[:16]!r}" if scheme else "a URL without a scheme"
        return f"{shown} is not allowed (only {', '.join(s + '://' for s in allowed)})"
    rest = url[len(scheme) + 1:]
    if not rest.startswith("//") or rest.startswith("///"):
        return "must be an absolute URL with a host (scheme://host/...)"
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return "is not a valid URL"
    if "@" in netloc:
        return "must not carry user-info (user:password@)"
    if netloc.startswith("["):
        end = netloc.find("]")
        host, after = (netloc[:end + 1], netloc[end + 1:]) if end > 0 else (netloc, "")
        port = after[1:] if after.startswith(":") else None
        if after and port is None:
            return "is not a valid URL"
    else:
        host, colon, port_text = netloc.partition(":")
        port = port_text if colon else None
    if port is not None and (_PORT.fullmatch(port) is None or (port and not
                                                               0 < int(port) <= 65535)):
        return "has a port that is not a number from 1 to 65535"
    if not host:
        return "has no host"
    if not host.isascii():
        return "host must be ASCII (write an internationalised name in its xn-- form)"
    if "%" in host:
        return "host must not be percent-encoded"
    lower = host.lower()
    if lower.startswith("["):
        if _IPV6_LITERAL.fullmatch(lower) is None:
            return "host is not a valid IPv6 literal"
    elif _HOST_NAME_CHARS.fullmatch(lower) is None:
        return "host has characters a host name cannot have"
    try:
        parsed = ada_url.URL(url)
    except ValueError:
        return "is not a valid URL"
    if parsed.protocol != scheme + ":" or parsed.username or parsed.password:
        return "is not a valid URL"
    return _Url(scheme, host, lower, str(parsed.hostname), parsed.host_type)


def check_odoo_url(url: object, allowed_hosts: Iterable[str] = ()) -> str | None:
    parsed = parse_url(url, ODOO_URL_SCHEMES)
    if isinstance(parsed, str):
        return parsed
    if _allow_key(parsed.host) in {_allow_key(h) for h in allowed_hosts}:
        return None
    if parsed.scheme == "s3":
        return _bucket_reason(parsed.written_host)
    return _host_reason(parsed, internal_ok=False)


def check_result_url(url: object, allow_http: bool = False) -> str | None:
    schemes = {"s3", "https", "http"} if allow_http else {"s3", "https"}
    parsed = parse_url(url, schemes)
    if isinstance(parsed, str):
        return parsed
    if parsed.scheme == "s3":
        return _bucket_reason(parsed.written_host)
    return _host_reason(parsed, internal_ok=True)
