"""The input policy: pure checks on what callers and n8n send, with no I/O.

Every ``check_*`` function returns ``None`` when the value is acceptable and otherwise a short
reason in plain words (safe to put in a 422 ``errors[].message`` or a history ``detail``: it
never echoes more than a few characters of the input). The JSON helpers raise
:class:`JsonTooDeep` or :class:`JsonInvalid` instead (both :class:`JsonRefused`, a
``ValueError``); nothing here ever lets a ``RecursionError`` escape.

The rules, in brief (``docs/input-rules.md`` states them for callers):

* URLs from Odoo (``input_assets``, ``brand.logo_url``): :func:`check_odoo_url`.
* URLs from n8n (sample and asset URLs): :func:`check_result_url`.
* Ids and tokens: :func:`check_sample_id`, :func:`check_asset_format`, :func:`check_user_id`.
* Money: :func:`parse_amount` / :func:`check_amount`.
* HTTP request line and headers: :func:`check_request_head`.
* JSON: :func:`json_depth_exceeds`, :func:`loads_bounded`, :func:`max_depth`,
  :func:`canonical_json`, :func:`body_hash` (:func:`validated_body_hash`).

URLs are interpreted the way the WHATWG URL standard does (browsers, curl's numeric-host
handling and, above all, Node.js, which n8n runs on) by the ``ada-url`` parser, the same parser
Node.js uses: ``0x7f.1``, ``2130706433``, ``0177.0.0.1``, ``127.1``, fullwidth digits and
ideographic dots all mean 127.0.0.1 to Node.js, so they mean it here too. On top of that the
syntax is held to a strict subset on which every common parser agrees (no backslashes, no
white space or control characters, no ``@`` in the authority, an ASCII host without ``%``),
so a URL cannot mean one host here and another in the fetcher.

What a pure check cannot see: a DNS name that *resolves* to an internal address (a wildcard
DNS service, DNS rebinding). The fetcher must still run with egress filtering; this policy
closes every spelling of an address and the names that are internal by definition.

Over 300 lines on purpose: every input rule with its reasons, pure and tested as one table.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, Final
from urllib.parse import urlsplit

import ada_url
import orjson

# ------------------------------------------------------------------ URLs
MAX_URL_LENGTH: Final = 2048
ODOO_URL_SCHEMES: Final = frozenset({"http", "https", "s3"})
_RESULT_SCHEMES: Final = frozenset({"s3", "https"})
_RESULT_SCHEMES_HTTP: Final = frozenset({"s3", "https", "http"})

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# Fast path for ASCII URLs: C0 controls, space, DEL and the backslash.
_ASCII_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_NAME_CHARS = re.compile(r"[a-z0-9._-]+")
_IPV6_LITERAL = re.compile(r"\[[0-9a-f:.]+\]")
_PORT = re.compile(r"[0-9]{0,5}")
_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")

# Names that are internal by definition (RFC 6761, 6762, 8375, ICANN's private-use .internal)
# or by very common convention (the Debian /etc/hosts names, Kubernetes' .svc, home routers).
_INTERNAL_NAMES: Final = frozenset({
    "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "broadcasthost",
})
_INTERNAL_SUFFIXES: Final = (
    ".localhost", ".local", ".localdomain", ".internal", ".intranet", ".lan", ".home",
    ".home.arpa", ".corp", ".private", ".svc",
)

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
# IANA's IPv4 special-purpose registry, every block that is not plain global unicast.
_IPV4_REFUSED: Final = (
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "shared address space, CGNAT"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local, cloud metadata"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "IETF protocol assignments"),
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("192.88.99.0/24"), "6to4 relay anycast"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("240.0.0.0/4"), "reserved"),  # includes 255.255.255.255, the broadcast address
)
# IPv6 blocks that embed an IPv4 address in their last 32 bits (6to4 is handled apart).
_IPV6_EMBEDDING: Final = (
    (_V6("::ffff:0:0/96"), "IPv4-mapped"),
    (_V6("::ffff:0:0:0/96"), "IPv4-translated"),
    (_V6("64:ff9b::/96"), "NAT64"),
    (_V6("::/96"), "IPv4-compatible"),
)
_IPV6_REFUSED: Final = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("64:ff9b:1::/48"), "local-use NAT64"),
    (_V6("100::/64"), "discard-only"),
    (_V6("2001::/32"), "Teredo, embeds an IPv4 address"),
    (_V6("2001::/23"), "IETF protocol assignments"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    (_V6("5f00::/16"), "segment routing"),
    (_V6("fc00::/7"), "unique-local"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local"),
    (_V6("ff00::/8"), "multicast"),
)
_GLOBAL_UNICAST: Final = _V6("2000::/3")
_SIX_TO_FOUR: Final = _V6("2002::/16")


@dataclass(frozen=True)
class _Url:
    scheme: str  # lower case
    written_host: str  # as written (IPv6 with its brackets)
    host: str  # as written, lower case
    parsed_host: str  # the host as the WHATWG parser serialises it
    host_type: ada_url.HostType


def _unsafe_char(text: str) -> str | None:
    """A reason if ``text`` has a control, format, white-space or backslash character."""
    if text.isascii():
        found = _ASCII_UNSAFE.search(text)
        if found is None:
            return None
        char = found.group()
    else:
        char = next((c for c in text if c == "\\" or unicodedata.category(c)[0] in "CZ"), "")
        if not char:
            return None
    if char == "\\":
        return "contains a backslash"
    return f"contains U+{ord(char):04X} (a control, format or white-space character)"


def _split_url(url: object, schemes: frozenset[str]) -> tuple[str, str] | str:
    """The checks on the whole URL (type, length, characters, scheme, ``//``); then its
    lower-case scheme and its authority (``netloc``: what follows ``//`` up to the first
    ``/``, ``?`` or ``#``, exactly what ``urlsplit`` returns once these checks passed)."""
    if not isinstance(url, str):
        return "must be a string"
    if len(url) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    unsafe = _unsafe_char(url)
    if unsafe is not None:
        return unsafe
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group()[:-1].lower() if scheme_match else ""
    if scheme not in schemes:
        allowed = sorted(schemes)
        shown = f"scheme {scheme[:16]!r}" if scheme else "a URL without a scheme"
        return f"{shown} is not allowed (only {', '.join(s + '://' for s in allowed)})"
    start = len(scheme) + 3
    if url[start - 2:start] != "//" or url[start:start + 1] == "/":
        return "must be an absolute URL with a host (scheme://host/...)"
    end = len(url)
    for delimiter in "/?#":
        found = url.find(delimiter, start, end)
        if found >= 0:
            end = found
    return scheme, url[start:end]


# How many distinct (scheme, authority) pairs each cache keeps: results name a handful of
# buckets and hosts; anything beyond that is only parsed again (the caches stay bounded).
_AUTHORITY_CACHE = 1024


@lru_cache(maxsize=_AUTHORITY_CACHE)
def _parse_authority(scheme: str, netloc: str) -> _Url | str:
    """The checks on the authority: user-info, host spelling, port, the WHATWG parse.

    A pure function of the scheme and the authority: behind the checks of :func:`_split_url`
    (no white space, controls or backslashes anywhere), the rest of a URL (path, query,
    fragment) can neither make ``urlsplit`` or ada refuse it nor change the host either of
    them reads; so each is parsed once as ``scheme://netloc/`` and the answer is cached.
    ``tests/unit/test_url_policy_cache.py`` holds this to the uncached whole-URL parse.
    """
    authority = f"{scheme}://{netloc}/"
    try:
        urlsplit(authority)  # refuses unbalanced brackets, an IPv4 or bad IPv6 in them, ...
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
        parsed = ada_url.URL(authority)
    except ValueError:
        return "is not a valid URL"
    if parsed.protocol != scheme + ":" or parsed.username or parsed.password:
        return "is not a valid URL"  # unreachable while the checks above hold; kept as a guard
    return _Url(scheme, host, lower, str(parsed.hostname), parsed.host_type)


def _ipv4_reason(ip: ipaddress.IPv4Address) -> str | None:
    for network, kind in _IPV4_REFUSED:
        if ip in network:
            return kind
    return None if ip.is_global else "not globally routable"


def _ipv6_reason(ip: ipaddress.IPv6Address) -> str | None:
    for network, kind in _IPV6_REFUSED[:2]:  # :: and ::1 before the IPv4-compatible block
        if ip in network:
            return kind
    embedded: tuple[ipaddress.IPv4Address, str] | None = None
    if ip in _SIX_TO_FOUR:
        embedded = (ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF), "6to4")
    for network, kind in _IPV6_EMBEDDING:
        if embedded is None and ip in network:
            embedded = (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), kind)
    if embedded is not None:
        v4, kind = embedded
        inner = _ipv4_reason(v4)
        return f"{kind}, embedding {v4}: {inner}" if inner else None
    for network, kind in _IPV6_REFUSED[2:]:
        if ip in network:
            return kind
    if ip not in _GLOBAL_UNICAST:
        return "reserved"
    return None if ip.is_global else "not globally routable"


def _labels(name: str) -> list[str] | None:
    """The labels of the DNS name ``name`` (lower-case ASCII, one trailing dot allowed)."""
    bare = name[:-1] if name.endswith(".") else name
    labels = bare.split(".")
    if len(bare) > 253 or any(not 0 < len(label) <= 63 for label in labels):
        return None
    for label in labels:
        if label.startswith("xn--"):
            try:
                label[4:].encode("ascii").decode("punycode")
            except UnicodeError:
                return None
    return labels


def _host_reason(url: _Url, *, internal_ok: bool) -> str | None:
    if url.host_type == ada_url.HostType.IPV4:
        v4 = ipaddress.IPv4Address(url.parsed_host)
        kind = None if internal_ok else _ipv4_reason(v4)
        if kind is not None:
            return f"points at {v4} ({kind})"
        if url.host != url.parsed_host:
            return f"numeric host must be written in dotted decimal ({v4})"
        return None
    if url.host_type == ada_url.HostType.IPV6:
        v6 = ipaddress.IPv6Address(url.parsed_host[1:-1])
        kind = None if internal_ok else _ipv6_reason(v6)
        return f"points at [{v6.compressed}] ({kind})" if kind is not None else None
    labels = _labels(url.parsed_host)
    if labels is None:
        return "host is not a valid DNS name"
    if internal_ok:
        return None
    name = ".".join(labels)
    if name in _INTERNAL_NAMES or name.endswith(_INTERNAL_SUFFIXES):
        return "names a host inside the private network"
    if len(labels) == 1:
        return "a single-label host name resolves inside the private network"
    return None


def _bucket_reason(bucket: str) -> str | None:
    """Up to 63 of ``a-z0-9.-`` (letter or digit at both ends, no ``..``), not an address."""
    if _BUCKET.fullmatch(bucket) is None or ".." in bucket:
        return "bucket name must be up to 63 lower-case letters, digits, dots and hyphens"
    try:
        as_http = ada_url.URL(f"http://{bucket}/")
    except ValueError:
        return "bucket name must not look like a network address"
    if as_http.host_type != ada_url.HostType.DEFAULT:
        return "bucket name must not look like a network address"
    return None


def _allow_key(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]")


def check_odoo_url(url: object, allowed_hosts: Iterable[str] = ()) -> str | None:
    """Why the URL Odoo gave (``input_assets``, ``brand.logo_url``) is refused, or ``None``.

    Accepted: ``http://``, ``https://`` and ``s3://`` URLs without user-info, at most
    :data:`MAX_URL_LENGTH` characters, with no control, format or white-space character and no
    backslash, whose host is ASCII and not percent-encoded. For http(s), the host must not
    point at a loopback, private, link-local, unique-local, unspecified, multicast, reserved,
    documentation, benchmarking or CGNAT address, in any spelling the WHATWG URL parser
    accepts, nor at an IPv6 address embedding such an IPv4 address (mapped, compatible,
    translated, NAT64, 6to4; Teredo is refused outright); a public IPv4 address must be written
    in plain dotted decimal. Host names that are internal by definition are refused:
    ``localhost`` and ``*.localhost``, ``*.local``, ``*.internal``, ``*.home.arpa``, the other
    suffixes in ``_INTERNAL_SUFFIXES``, and single-label names (``http://minio/``). For
    ``s3://`` the host is a bucket name: up to 63 lower-case letters, digits, dots and hyphens,
    a letter or digit at both ends, and not shaped like an IP address.

    A host in ``allowed_hosts`` (compared exactly, case-insensitively, IPv6 with or without
    brackets) skips the address and name rules; the syntax rules still apply.
    """
    split = _split_url(url, ODOO_URL_SCHEMES)
    if isinstance(split, str):
        return split
    parsed = _parse_authority(*split)
    if isinstance(parsed, str):
        return parsed
    if _allow_key(parsed.host) in {_allow_key(h) for h in allowed_hosts}:
        return None
    return _authority_reason(*split, False)


def check_result_url(url: object, allow_http: bool = False) -> str | None:
    """Why a sample or asset URL reported by n8n is refused, or ``None``.

    Accepted: ``s3://`` and ``https://`` (and ``http://`` when ``allow_http``, the embedded
    mode's default) URLs, at most :data:`MAX_URL_LENGTH` characters, without user-info, control,
    format or white-space characters or backslashes, whose host is ASCII, not percent-encoded
    and a valid host name, dotted-decimal IPv4 or IPv6 literal, or (for s3) bucket name.
    Internal hosts are allowed here: the asset store of a self-hosted installation (MinIO on
    ``localhost`` in the embedded mode) often is one, and the web app, not this service, loads
    these URLs.
    """
    split = _split_url(url, _RESULT_SCHEMES_HTTP if allow_http else _RESULT_SCHEMES)
    if isinstance(split, str):
        return split
    return _authority_reason(*split, True)


@lru_cache(maxsize=_AUTHORITY_CACHE)
def _authority_reason(scheme: str, netloc: str, internal_ok: bool) -> str | None:
    """Why a URL with this scheme and authority is refused (allow-list aside), or ``None``:
    pure, so cached like :func:`_parse_authority`."""
    parsed = _parse_authority(scheme, netloc)
    if isinstance(parsed, str):
        return parsed
    if parsed.scheme == "s3":
        return _bucket_reason(parsed.written_host)
    return _host_reason(parsed, internal_ok=internal_ok)


# ------------------------------------------------------------------ ids and tokens
SAMPLE_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
ASSET_FORMATS: Final = frozenset({"png", "jpeg", "webp"})
USER_ID_MAX_LENGTH: Final = 64
_REFUSED_IN_USER_IDS: Final = {
    "Cc": "a control character",
    "Cf": "a format character (such as a bidi override or a zero-width character)",
    "Cs": "a surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


def check_sample_id(value: object) -> str | None:
    """``None`` if ``value`` is 1-64 of ``A-Z a-z 0-9 . _ -`` (ASCII only, nothing else)."""
    if isinstance(value, str) and SAMPLE_ID.fullmatch(value) is not None:
        return None
    return "sample_id must be 1 to 64 of the characters A-Z a-z 0-9 . _ -"


def check_asset_format(value: object) -> str | None:
    """``None`` if ``value`` is one of :data:`ASSET_FORMATS`, exactly (lower case).

    A closed list rather than a token rule: the web app turns the format into a media type,
    and only raster formats that cannot carry script belong there (``svg`` can).
    """
    if isinstance(value, str) and value in ASSET_FORMATS:
        return None
    return f"format must be one of {', '.join(sorted(ASSET_FORMATS))}"


def check_user_id(value: object) -> str | None:
    """Why ``value`` is not a safe user id, or ``None``.

    The rule: a string of 1 to 64 characters (code points) that

    * has no control (Cc), format (Cf: bidi overrides and isolates, zero-width space, joiner
      and non-joiner, the BOM...), surrogate (Cs), private-use (Co) or unassigned (Cn, as of the
      running Python's Unicode version) character, and no line or paragraph separator (Zl, Zp);
    * neither starts nor ends with white space;
    * contains no ``/`` or ``\\`` and is not ``.`` or ``..``, so it is one path segment
      wherever it is used to build a storage key (``users/<user_id>/...``).

    Spaces inside, letters of any script, digits and punctuation are allowed.
    """
    if not isinstance(value, str):
        return "must be a string"
    if not 1 <= len(value) <= USER_ID_MAX_LENGTH:
        return f"must be 1 to {USER_ID_MAX_LENGTH} characters"
    for char in value:
        kind = _REFUSED_IN_USER_IDS.get(unicodedata.category(char))
        if kind is not None:
            return f"must not contain U+{ord(char):04X} ({kind})"
    if value[0].isspace() or value[-1].isspace():
        return "must not start or end with white space"
    if value in (".", "..") or "/" in value or "\\" in value:
        return "must not be . or .. nor contain / or \\"
    return None


# ------------------------------------------------------------------ amounts
AMOUNT_MAX_INTEGER_DIGITS: Final = 10
_AMOUNT = re.compile(rf"[0-9]{{1,{AMOUNT_MAX_INTEGER_DIGITS}}}(?:\.[0-9]{{1,2}})?")
_CENT: Final = Decimal("0.01")


class InvalidAmount(ValueError):
    """The amount is refused; ``str(exc)`` is the reason."""


def parse_amount(value: object, *, allow_zero: bool = False) -> Decimal:
    """The amount as a ``Decimal`` with two places, or :class:`InvalidAmount`.

    Accepted: a string of 1-10 ASCII digits, optionally a dot and 1-2 ASCII digits
    (``"10"``, ``"10.5"``, ``"10.50"``), greater than zero unless ``allow_zero``. Refused: other
    digits (Arabic-Indic ``"\\u0661\\u0660\\u0660"``, fullwidth ``"\\uff15"``), signs,
    exponents, white space (a trailing newline included), thousands separators, and numbers
    instead of strings.
    """
    if not isinstance(value, str):
        raise InvalidAmount('must be a string such as "10.00"')
    if _AMOUNT.fullmatch(value) is None:
        raise InvalidAmount(
            f'must be 1 to {AMOUNT_MAX_INTEGER_DIGITS} ASCII digits with at most two decimal '
            'places, e.g. "10.00" (no sign, exponent or white space)')
    amount = Decimal(value).quantize(_CENT)
    if amount == 0 and not allow_zero:
        raise InvalidAmount("must be greater than zero")
    return amount


def check_amount(value: object, *, allow_zero: bool = False) -> str | None:
    """The reason :func:`parse_amount` would refuse ``value``, or ``None``."""
    try:
        parse_amount(value, allow_zero=allow_zero)
    except InvalidAmount as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------ request line and headers
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_TARGET_BYTES: Final = 8 * 1024


@dataclass(frozen=True)
class HeadRefusal:
    """Why a request's head is refused: the status, the problem ``code`` and a detail."""

    status: int
    code: str
    detail: str


def check_request_head(headers: Iterable[tuple[bytes, bytes]], raw_path: bytes,
                       query_string: bytes = b"", *, max_header_bytes: int = MAX_HEADER_BYTES,
                       max_target_bytes: int = MAX_TARGET_BYTES) -> HeadRefusal | None:
    """The limits on an HTTP request's head, from an ASGI scope's parts, or ``None``.

    The request target (path and query, as sent) may have at most ``max_target_bytes``
    (8 KiB: 414 ``uri_too_long``); all header lines together, counted as ``name: value\r\n``,
    at most ``max_header_bytes`` (16 KiB, Node.js's default: 431
    ``request_header_fields_too_large``). This gives the exact limit and a problem response;
    bounding what the server *buffers* before the app sees the request is the HTTP parser's
    job (uvicorn's h11 ``h11_max_incomplete_event_size``; its httptools parser has no limit).
    """
    target = len(raw_path) + (len(query_string) + 1 if query_string else 0)
    if target > max_target_bytes:
        return HeadRefusal(414, "uri_too_long",
                           f"the request target is limited to {max_target_bytes} bytes")
    total = 0
    for name, value in headers:
        total += len(name) + len(value) + 4
        if total > max_header_bytes:
            return HeadRefusal(431, "request_header_fields_too_large",
                               f"request headers are limited to {max_header_bytes} bytes")
    return None


# ------------------------------------------------------------------ JSON
JSON_MAX_DEPTH: Final = 32
# A whole string, escapes skipped; an unterminated one runs to the end of the text.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_AS_SQUARE: Final = bytes.maketrans(b"{}", b"[]")
_OPEN: Final = ord("[")


class JsonRefused(ValueError):
    """A JSON document (or value) is refused; ``str(exc)`` is the reason."""


class JsonInvalid(JsonRefused):
    """Not JSON, or not JSON this service takes (NaN, infinities, lone surrogates...)."""


class JsonTooDeep(JsonRefused):
    """Arrays and objects nested deeper than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"is nested deeper than {limit} levels")
        self.limit = limit


def max_depth(value: object) -> int:
    """How deeply arrays and objects nest in ``value``: 0 for a scalar, 1 for ``[]`` or ``{}``.

    Iterative, so any depth is fine; ``value`` must not contain itself.
    """
    return _depth(value, None)


def depth_exceeds(value: object, limit: int = JSON_MAX_DEPTH) -> bool:
    """Whether ``value`` nests deeper than ``limit``; stops as soon as it knows (cycles too)."""
    return _depth(value, limit) > limit


def _depth(value: object, stop_above: int | None) -> int:
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[object] = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if stop_above is not None and deepest > stop_above:
            return deepest
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list | tuple))
    return deepest


def json_depth_exceeds(raw: bytes | bytearray | memoryview | str,
                       limit: int = JSON_MAX_DEPTH) -> bool:
    """Whether the JSON text ``raw`` opens more than ``limit`` nested arrays/objects.

    A byte-level scan, no parser: brackets inside strings (escapes included) do not count.
    For valid JSON it agrees with ``max_depth(json.loads(raw)) > limit``; for invalid JSON it
    never says less than a parser would reach before failing, so a document it passes cannot
    drive a recursive parser deeper than ``limit``. Bytes must be UTF-8 (or ASCII), which is
    what :func:`loads_bounded` accepts.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case: not even enough brackets, strings or not
    depth = 0
    for bracket in _JSON_STRING.sub(b"", data).translate(_AS_SQUARE, _NOT_BRACKETS):
        if bracket == _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def loads_bounded(raw: bytes | bytearray | memoryview | str,
                  limit: int = JSON_MAX_DEPTH) -> Any:
    """Parse strict JSON (RFC 8259, UTF-8) nested at most ``limit`` deep.

    Raises :class:`JsonTooDeep` (decided by :func:`json_depth_exceeds` before any parsing) or
    :class:`JsonInvalid` (malformed, not UTF-8, NaN/Infinity, a number too large for a double,
    a lone surrogate escape). Parsed by orjson: integers beyond 64 bits come back as floats.
    """
    if json_depth_exceeds(raw, limit):
        raise JsonTooDeep(limit)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise JsonInvalid(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:  # unreachable below orjson's own limit of 1024; a guard
        raise JsonTooDeep(limit) from None


def canonical_json(value: object, limit: int = JSON_MAX_DEPTH) -> bytes:
    """``value`` as canonical JSON bytes: keys sorted, no white space, UTF-8 (not \\u-escaped).

    ``value`` is JSON data (dicts with string keys, lists, str, int, float, bool, None; pass a
    pydantic model as ``model_dump(mode="json")``). Numbers keep their parsed type: ``1`` and
    ``1.0`` differ, as they do when echoed back. Raises :class:`JsonTooDeep` above ``limit``
    and :class:`JsonInvalid` for anything else that is not JSON (NaN, other types, non-string
    keys, lone surrogates).
    """
    if depth_exceeds(value, limit):
        raise JsonTooDeep(limit)
    if not _keys_are_strings(value):
        raise JsonInvalid("has an object key that is not a string")
    return _canonical_bytes(value)


def _canonical_bytes(value: object) -> bytes:
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise JsonInvalid(f"cannot be written as JSON ({type(exc).__name__})") from None


def _keys_are_strings(value: object) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if not all(isinstance(key, str) for key in node):
                return False
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return True


def body_hash(value: object, limit: int = JSON_MAX_DEPTH) -> str:
    """SHA-256 (hex) of :func:`canonical_json`: the same for any key order."""
    return hashlib.sha256(canonical_json(value, limit)).hexdigest()


def validated_body_hash(value: object) -> str:
    """:func:`body_hash` of a request body already validated: the same digest, minus two walks.

    For ``model_dump(mode="json")`` of a model parsed from a body that passed
    :func:`loads_bounded`: it is JSON data, nested no deeper than that body was (plus the
    models' own shallow defaults), its keys field names or JSON object keys. So the depth and
    key checks of :func:`canonical_json` cannot fail (they were about 8 % of the event loop's
    samples in the bench's profile). Anything else goes through :func:`body_hash`.

    A tree of only dicts (string keys), lists, strings, integers, booleans and ``None`` — no
    floats, whose text orjson spells differently (``1e16`` for ``1e+16``) — is written by
    orjson with sorted keys, byte for byte what ``json.dumps`` writes, at a third of the
    cost; anything else, or anything orjson refuses (an integer beyond 64 bits, a lone
    surrogate), takes the ``json.dumps`` path (``tests/unit/test_body_hash.py`` holds the two
    to the same bytes and the same refusals).
    """
    if _plain_json(value):
        try:
            return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()
        except orjson.JSONEncodeError:
            pass
    return hashlib.sha256(_canonical_bytes(value)).hexdigest()


_PLAIN_SCALARS: Final = frozenset({str, int, bool, type(None)})


def _plain_json(value: object) -> bool:
    """Whether ``value`` is only dicts with ``str`` keys, lists, and str/int/bool/None
    (exact types, no subclasses): the JSON orjson and ``json.dumps`` write alike."""
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            for key, item in node.items():
                if type(key) is not str:
                    return False
                item_kind = type(item)
                if item_kind is dict or item_kind is list:
                    stack.append(item)
                elif item_kind not in _PLAIN_SCALARS:
                    return False
        elif type(node) is list:
            for item in node:
                item_kind = type(item)
                if item_kind is dict or item_kind is list:
                    stack.append(item)
                elif item_kind not in _PLAIN_SCALARS:
                    return False
        elif type(node) not in _PLAIN_SCALARS:
            return False
    return True
