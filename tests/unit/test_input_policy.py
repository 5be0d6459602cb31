"""The input policy's pure building blocks (``saga.input_policy``) and the list cursor."""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from api.app import ApiDeps, create_app
from api.routes.generations import decode_cursor as _decode_cursor
from api.schemas import SelectionBody, StartGenerationBody
from saga.input_policy import (
    JSON_MAX_DEPTH,
    InvalidAmount,
    JsonInvalid,
    JsonTooDeep,
    body_hash,
    canonical_json,
    check_amount,
    check_asset_format,
    check_odoo_url,
    check_request_head,
    check_result_url,
    check_sample_id,
    check_user_id,
    depth_exceeds,
    json_depth_exceeds,
    loads_bounded,
    max_depth,
    parse_amount,
    validated_body_hash,
)
from tests.conftest import World

SUP = {"Authorization": "Bearer sup-key"}


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# ------------------------------------------------------------------ list cursor
@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    app = create_app(ApiDeps(bus=world.bus, queries=world.queries, api_keys={"sup-key": "support"}))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


# Offsets that move a valid timestamp outside datetime's range when turned into UTC.
OUT_OF_RANGE_CURSORS = [
    '["0001-01-01T00:00:00+14:00", "x"]',
    '["9999-12-31T23:59:59-14:00", "x"]',
]


@pytest.mark.parametrize("raw", OUT_OF_RANGE_CURSORS)
def test_cursor_outside_utc_range_is_refused_by_the_decoder(raw: str) -> None:
    with pytest.raises(ValueError):
        _decode_cursor(_b64(raw))


@pytest.mark.parametrize("raw", OUT_OF_RANGE_CURSORS)
def test_cursor_outside_utc_range_is_422_not_500(client: TestClient, raw: str) -> None:
    resp = client.get("/api/v1/generations", params={"cursor": _b64(raw)}, headers=SUP)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["code"] == "validation_error"
    assert [e["field"] for e in problem["errors"]] == ["cursor"]


def test_a_valid_cursor_decodes_to_utc() -> None:
    at, last_id = _decode_cursor(_b64('["2026-11-02T14:00:00+02:00", "g-1"]'))
    assert at.utcoffset() is not None and at.utcoffset().total_seconds() == 0
    assert (at.hour, last_id) == (12, "g-1")


# ------------------------------------------------------------------ URLs from Odoo
REFUSED_ODOO_URLS = [
    # the issue's spellings
    ("http://127.0.0.1:5432/", "127.0.0.1 (loopback)"),
    ("http://[::1]/", "[::1] (loopback)"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 (link-local"),
    ("http://0x7f000001/", "127.0.0.1 (loopback)"),
    ("http://2130706433/", "127.0.0.1 (loopback)"),
    ("http://user:pass@10.0.0.1/", "user-info"),
    ("https://user@cdn.example.com/a.png", "user-info"),
    ("https://@cdn.example.com/a.png", "user-info"),
    ("javascript:alert(1)", "scheme 'javascript'"),
    ("data:text/html,<script>alert(1)</script>", "scheme 'data'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://x.io/a.png", "scheme 'ftp'"),
    ("a.png", "without a scheme"),
    # other numeric spellings the WHATWG parser (Node.js, browsers) accepts
    ("http://0x7f.1/", "127.0.0.1 (loopback)"),
    ("http://0x7F.0x0.0x0.0x1/", "127.0.0.1 (loopback)"),
    ("http://0177.0.0.1/", "127.0.0.1 (loopback)"),
    ("http://017700000001/", "127.0.0.1 (loopback)"),
    ("http://127.1/", "127.0.0.1 (loopback)"),
    ("http://127.0.1/", "127.0.0.1 (loopback)"),
    ("http://127.0.0.1./", "127.0.0.1 (loopback)"),
    ("http://0/", "0.0.0.0 (unspecified)"),
    ("http://0x/", "0.0.0.0 (unspecified)"),
    ("http://0.0.0.0:8080/", "0.0.0.0 (unspecified)"),
    ("http://10.1.2.3/", "10.1.2.3 (private)"),
    ("http://172.16.0.1/", "(private)"),
    ("http://192.168.1.1/", "(private)"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "reserved"),
    ("http://198.18.0.1/", "benchmarking"),
    ("http://192.0.2.1/", "documentation"),
    # IPv6 literals and IPv4 embedded in IPv6
    ("http://[::]/", "unspecified"),
    ("http://[0:0:0:0:0:0:0:1]/", "[::1] (loopback)"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped, embedding 127.0.0.1"),
    ("http://[::ffff:7f00:1]/", "IPv4-mapped, embedding 127.0.0.1"),
    ("http://[::ffff:a9fe:a9fe]/", "embedding 169.254.169.254"),
    ("http://[::127.0.0.1]/", "IPv4-compatible, embedding 127.0.0.1"),
    ("http://[::ffff:0:10.0.0.1]/", "IPv4-translated, embedding 10.0.0.1"),
    ("http://[64:ff9b::10.0.0.1]/", "NAT64, embedding 10.0.0.1"),
    ("http://[2002:7f00:1::]/", "6to4, embedding 127.0.0.1"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "percent-encoded"),
    ("http://[fd00::1]/", "unique-local"),
    ("http://[fc00::1]:5432/", "unique-local"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[2001:db8::1]/", "documentation"),
    ("http://[::1/", "not a valid URL"),
    # names that are internal by definition
    ("http://localhost/", "private network"),
    ("http://LOCALHOST:5432/", "private network"),
    ("http://localhost./", "private network"),
    ("http://db.localhost/", "private network"),
    ("http://metadata.google.internal/computeMetadata/v1/", "private network"),
    ("http://printer.local/", "private network"),
    ("http://postgres.default.svc/", "private network"),
    ("http://minio:9000/bucket/a.png", "single-label"),
    # spellings on which parsers disagree, refused outright
    ("http://%31%32%37.0.0.1/", "percent-encoded"),
    ("http://127.0.0.1%2f.example.com/", "percent-encoded"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "ASCII"),  # fullwidth digits
    ("http://127\u30020\u30020\u30021/", "ASCII"),  # ideographic full stops
    ("http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3/", "ASCII"),  # circled
    ("http://cdn.example.com\\@127.0.0.1/", "backslash"),
    ("http:\\\\127.0.0.1/", "backslash"),
    ("http:/127.0.0.1/", "absolute URL with a host"),
    ("http:127.0.0.1/", "absolute URL with a host"),
    ("http:///127.0.0.1/", "absolute URL with a host"),
    ("http://exam\tple.com/", "U+0009"),
    ("http://example.com/\n", "U+000A"),
    (" http://example.com/", "U+0020"),
    ("http://example.com/\u202e", "U+202E"),
    ("http://example.com/a\u200bb", "U+200B"),
    ("http://1.2.3.4.5/", "not a valid URL"),
    ("http://foo.0x1/", "not a valid URL"),
    ("http://134744072/", "dotted decimal (8.8.8.8)"),  # public, but spelled oddly
    ("http://8.8.8.8./", "dotted decimal (8.8.8.8)"),
    ("http://a..b.example.com/", "not a valid DNS name"),
    ("http://ex!ample.com/", "characters a host name cannot have"),
    ("http://example.com:0/", "port"),
    ("http://example.com:65536/", "port"),
    ("http://example.com:8o/", "port"),
    ("http:///", "absolute URL with a host"),
    ("https://:443/", "has no host"),
    ("https://cdn.example.com/" + "a" * 2048, "longer than 2048"),
    # s3: the host is a bucket name
    ("s3://127.0.0.1/key", "network address"),
    ("s3://0x7f000001/key", "network address"),
    ("s3://Bucket/key", "bucket name"),
    ("s3://-bucket/key", "bucket name"),
    ("s3://[::1]/key", "bucket name"),
    (None, "must be a string"),
    (42, "must be a string"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_ODOO_URLS)
def test_odoo_url_refused(url: object, reason: str) -> None:
    found = check_odoo_url(url)
    assert found is not None and reason in found, found


ACCEPTED_ODOO_URLS = [
    "https://cdn.example.com/a.png",
    "HTTPS://CDN.Example.COM/a.png?size=2#top",
    "http://x.io/0.png",
    "https://cdn.example.com:8443/a.png",
    "https://cdn.example.com./a.png",
    "https://8.8.8.8/a.png",
    "https://[2606:4700:4700::1111]/a.png",
    "https://[::ffff:8.8.8.8]/a.png",  # mapped, but public
    "https://xn--bcher-kva.example/a.png",
    "https://cdn.example.com/\u0444\u043e\u0442\u043e.png",  # non-ASCII in the path is fine
    "s3://creativeflow-assets/users/u-42/a.png",
    "s3://bucket/0.png",
    "s3://b/f.png",
    "https://cdn.example.com/" + "a" * 2000,
]


@pytest.mark.parametrize("url", ACCEPTED_ODOO_URLS)
def test_odoo_url_accepted(url: str) -> None:
    assert check_odoo_url(url) is None


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://minio:9000/bucket/a.png", ["minio"]),
    ("http://MinIO:9000/bucket/a.png", ["minio"]),
    ("http://10.0.0.5/a.png", ["10.0.0.5"]),
    ("http://localhost:9000/a.png", ["LOCALHOST"]),
    ("http://[fd00::1]/a.png", ["fd00::1"]),
    ("http://[fd00::1]/a.png", ["[FD00::1]"]),
    ("http://assets.corp/a.png", [" assets.corp "]),
])
def test_allowed_hosts_pass(url: str, allowed: list[str]) -> None:
    assert check_odoo_url(url) is not None
    assert check_odoo_url(url, allowed) is None


@pytest.mark.parametrize(("url", "allowed", "reason"), [
    # exact: another spelling of an allowed address is not allowed
    ("http://0x7f000001/", ["127.0.0.1"], "loopback"),
    ("http://127.1/", ["127.0.0.1"], "loopback"),
    ("http://minio.internal/", ["minio"], "private network"),
    ("http://minio.localhost/", ["minio"], "private network"),
    # the syntax rules still apply to allowed hosts
    ("http://user:pw@minio/", ["minio"], "user-info"),
    ("ftp://minio/", ["minio"], "scheme"),
    ("http://minio\\@x/", ["minio"], "backslash"),
])
def test_allowed_hosts_are_exact_and_keep_the_syntax_rules(
        url: str, allowed: list[str], reason: str) -> None:
    found = check_odoo_url(url, allowed)
    assert found is not None and reason in found, found


# Every block an IPv4 address must never be fetched from, with one address inside each.
INTERNAL_V4_NETWORKS = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
]
PUBLIC_V4 = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "151.101.1.69", "52.216.0.1"]


@st.composite
def internal_v4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    network = ipaddress.IPv4Network(draw(st.sampled_from(INTERNAL_V4_NETWORKS)))
    offset = draw(st.integers(0, network.num_addresses - 1))
    return network[offset]


def v4_spellings(ip: ipaddress.IPv4Address) -> list[str]:
    """Hosts that the WHATWG URL parser reads as ``ip``."""
    n = int(ip)
    octets = [int(o) for o in str(ip).split(".")]
    a, b, c, d = octets
    return [
        str(ip), f"{ip}.", str(n), hex(n), hex(n).upper().replace("0X", "0x"),
        "0" + oct(n)[2:],
        ".".join(hex(o) for o in octets),
        ".".join(f"0{o:o}" for o in octets),
        f"{a}.{b}.{(c << 8) | d}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{hex((c << 8) | d)}",
        f"[::ffff:{ip}]",
        f"[::ffff:{(n >> 16):x}:{(n & 0xFFFF):x}]",
        f"[64:ff9b::{ip}]",
        f"[2002:{(n >> 16):x}:{(n & 0xFFFF):x}::1]",
    ]


@settings(deadline=None)  # no timing in tests: the machine's CPU is shared
@given(internal_v4(), st.sampled_from(["http", "https", "HTTP"]),
       st.sampled_from(["", ":80", ":5432"]))
def test_every_spelling_of_an_internal_ipv4_address_is_refused(
        ip: ipaddress.IPv4Address, scheme: str, port: str) -> None:
    for host in v4_spellings(ip):
        url = f"{scheme}://{host}{port}/a.png"
        reason = check_odoo_url(url)
        assert reason is not None and str(ip) in reason, (url, reason)


@pytest.mark.parametrize("address", PUBLIC_V4)
def test_a_public_ipv4_address_passes_only_in_dotted_decimal(address: str) -> None:
    ip = ipaddress.IPv4Address(address)
    spellings = v4_spellings(ip)
    assert check_odoo_url(f"https://{spellings[0]}/a.png") is None
    for host in spellings[1:11]:  # the IPv4 spellings other than plain dotted decimal
        reason = check_odoo_url(f"https://{host}/a.png")
        assert reason is not None and "dotted decimal" in reason, (host, reason)
    for host in spellings[11:]:  # IPv6 forms embedding a public address are public
        assert check_odoo_url(f"https://{host}/a.png") is None, host


@settings(deadline=None)
@given(st.ip_addresses(v=4))
def test_any_ipv4_address_python_calls_non_global_is_refused(ip: ipaddress.IPv4Address) -> None:
    """An oracle independent of the module's table: Python's own classification."""
    verdict = check_odoo_url(f"http://{ip}/")
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        assert verdict is not None and str(ip) in verdict


@settings(deadline=None)
@given(st.ip_addresses(v=6))
def test_any_ipv6_address_python_calls_non_global_is_refused(ip: ipaddress.IPv6Address) -> None:
    verdict = check_odoo_url(f"http://[{ip}]/")
    embedded = ip.ipv4_mapped or ip.sixtofour
    for prefix in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96"):  # NAT64, translated, compat
        if embedded is None and ip in ipaddress.IPv6Network(prefix) and int(ip) > 1:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if embedded is not None:  # judged by the IPv4 address inside
        if not embedded.is_global:
            assert verdict is not None and str(embedded) in verdict
    elif not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_site_local:
        assert verdict is not None


# ------------------------------------------------------------------ URLs from n8n
@pytest.mark.parametrize(("url", "allow_http", "reason"), [
    ("javascript:alert(document.cookie)", True, "scheme 'javascript'"),
    ("JavaScript:alert(1)", True, "scheme 'javascript'"),
    ("data:text/html,<script>alert(1)</script>", True, "scheme 'data'"),
    ("data:image/svg+xml;base64,PHN2Zz4=", True, "scheme 'data'"),
    ("file:///etc/passwd", True, "scheme 'file'"),
    ("vbscript:msgbox", True, "scheme 'vbscript'"),
    ("http://169.254.169.254/latest/meta-data/", False, "scheme 'http'"),
    ("http://cdn.example.com/a.png", False, "scheme 'http'"),
    ("https://user:pw@cdn.example.com/a.png", True, "user-info"),
    ("https://cdn.example.com/a.png\r\nSet-Cookie: x", True, "U+000D"),
    ("https://cdn.example.com/a b.png", True, "U+0020"),
    ("https://cdn.example.com/\u2028", True, "U+2028"),
    ("https://cdn.example.com/\x00", True, "U+0000"),
    ("https://cdn.example.com\\@evil.example/", True, "backslash"),
    ("//cdn.example.com/a.png", True, "without a scheme"),
    ("/assets/a.png", True, "without a scheme"),
    ("https:/cdn.example.com/a.png", True, "absolute URL"),
    ("https://0x7f.1/a.png", True, "dotted decimal"),
    ("https://%65vil.example/a.png", True, "percent-encoded"),
    ("https://\u0435xample.com/a.png", True, "ASCII"),  # Cyrillic e
    ("https://cdn.example.com/" + "a" * 2048, True, "longer than 2048"),
    ("s3://B/a.png", True, "bucket name"),
    ("<img src=x onerror=alert(1)>", True, "U+0020"),
    ("<img/src=x/onerror=alert(1)>", True, "without a scheme"),
    (["https://cdn.example.com/a.png"], True, "must be a string"),
])
def test_result_url_refused(url: object, allow_http: bool, reason: str) -> None:
    found = check_result_url(url, allow_http)
    assert found is not None and reason in found, found


@pytest.mark.parametrize(("url", "allow_http"), [
    ("s3://creativeflow-assets/users/u-42/generations/g/samples/j/s1.png", False),
    ("s3://b/f.png", False),
    ("https://cdn.example.com/a.png?X-Amz-Signature=abc&X-Amz-Expires=60", False),
    ("https://minio:9000/a.png", False),  # the asset store may be internal
    ("http://localhost:9000/assets/a.png", True),
    ("http://127.0.0.1:8080/assets/a.png", True),
    ("HTTPS://CDN.EXAMPLE.COM/a.png", False),
])
def test_result_url_accepted(url: str, allow_http: bool) -> None:
    assert check_result_url(url, allow_http) is None


# ------------------------------------------------------------------ ids and tokens
@pytest.mark.parametrize("sample_id", [
    "s1", "S-1_2.png", "a" * 64, "0", "..", "uuid-5f0c7a2e-9d7c-4c1a-b7e4-2d2b6f1f0e11"[:64],
])
def test_sample_id_accepted(sample_id: str) -> None:
    assert check_sample_id(sample_id) is None


@pytest.mark.parametrize("sample_id", [
    "", "a" * 65, "<img src=x onerror=alert(1)>", "s1\n", "s 1", "s/1", "s\\1", "s1;",
    "\u0661", "\uff53\uff11", "s\u200b1", "s\u202e1", "caf\u00e9", None, 1, ["s1"],
])
def test_sample_id_refused(sample_id: object) -> None:
    assert check_sample_id(sample_id) is not None


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_asset_format_accepted(fmt: str) -> None:
    assert check_asset_format(fmt) is None


@pytest.mark.parametrize("fmt", [
    "<svg>", "svg", "svg+xml", "image/svg+xml", "html", "PNG", "png\n", " png", "", "gif",
    "png;base64", None, 1,
])
def test_asset_format_refused(fmt: object) -> None:
    assert check_asset_format(fmt) is not None


@pytest.mark.parametrize("user_id", [
    "u-42", "42", "a" * 64, "Jos\u00e9 Garc\u00eda", "\u5c71\u7530", "user@example.com",
    "a.b", "...", "a..b", "u_1:2", "\u0645\u062d\u0645\u062f",  # Arabic letters are letters
])
def test_user_id_accepted(user_id: str) -> None:
    assert check_user_id(user_id) is None


@pytest.mark.parametrize(("user_id", "reason"), [
    ("", "1 to 64"),
    ("a" * 65, "1 to 64"),
    ("u\x00", "U+0000 (a control"),
    ("u\x1b[31m", "U+001B (a control"),
    ("u\x85", "U+0085 (a control"),
    ("u\u202e24-u", "U+202E (a format"),  # right-to-left override
    ("u\u2066x", "U+2066 (a format"),  # left-to-right isolate
    ("u\u200b42", "U+200B (a format"),  # zero-width space
    ("u\u200d42", "U+200D (a format"),  # zero-width joiner
    ("\ufeffu42", "U+FEFF (a format"),  # byte order mark
    ("u\ud800", "U+D800 (a surrogate"),
    ("u\ue000", "U+E000 (a private-use"),
    ("u\U000e0041", "U+E0041 (a format"),  # tag character
    ("u\u0378", "U+0378 (an unassigned"),
    ("u\uffff", "U+FFFF (an unassigned"),
    ("u\u2028x", "U+2028 (a line separator"),
    ("u\u2029x", "U+2029 (a paragraph separator"),
    (" u42", "white space"),
    ("u42 ", "white space"),
    ("u42\u3000", "white space"),
    ("\u00a0u42", "white space"),
    (".", "must not be . or .."),
    ("..", "must not be . or .."),
    ("../x", "must not be . or .."),
    ("a/b", "must not be . or .."),
    ("a\\b", "must not be . or .."),
    (None, "must be a string"),
    (42, "must be a string"),
])
def test_user_id_refused(user_id: object, reason: str) -> None:
    found = check_user_id(user_id)
    assert found is not None and reason in found, found


# ------------------------------------------------------------------ amounts
@pytest.mark.parametrize(("text", "amount"), [
    ("10", "10.00"), ("10.5", "10.50"), ("10.50", "10.50"), ("0.01", "0.01"),
    ("9999999999.99", "9999999999.99"), ("007", "7.00"),
])
def test_amount_accepted(text: str, amount: str) -> None:
    parsed = parse_amount(text)
    assert parsed == Decimal(amount) and str(parsed) == amount
    assert check_amount(text) is None


@pytest.mark.parametrize("text", [
    "\u0661\u0660\u0660",  # Arabic-Indic 100
    "\uff15",  # fullwidth 5
    "\u0967\u0966",  # Devanagari 10
    "1\u0660",  # mixed
    "100\n", "100\r\n", " 100", "100 ", "\t1",
    "+5", "-5", "1e2", "1E2", "0x10", "1_000", "1,000", "1.000", "1.", ".5", "", ".",
    "0", "0.00", "00.0", "NaN", "Infinity", "12345678901", "1.2.3",
])
def test_amount_refused(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(text)
    assert check_amount(text) is not None


@pytest.mark.parametrize("value", [100, 5.0, Decimal("5"), None, b"5"])
def test_amount_must_be_a_string(value: object) -> None:
    assert check_amount(value) == 'must be a string such as "10.00"'


def test_zero_amount_only_when_allowed() -> None:
    assert parse_amount("0", allow_zero=True) == Decimal("0.00")
    assert check_amount("0.00", allow_zero=True) is None


@settings(deadline=None)
@given(st.text(max_size=14))
def test_an_accepted_amount_is_only_ascii_digits_and_one_dot(text: str) -> None:
    if check_amount(text) is None:
        assert text.isascii() and text.replace(".", "", 1).isdigit()
        assert parse_amount(text) > 0


# ------------------------------------------------------------------ request head
def test_request_head_within_limits() -> None:
    headers = [(b"host", b"x"), (b"x-pad", b"a" * (16 * 1024 - 20))]
    assert check_request_head(headers, b"/" + b"a" * 8191) is None
    assert check_request_head([], b"/a", b"q" * (8 * 1024 - 3)) is None


def test_request_target_over_8k_is_414() -> None:
    refusal = check_request_head([], b"/" + b"a" * 8192)
    assert refusal is not None and (refusal.status, refusal.code) == (414, "uri_too_long")
    refusal = check_request_head([], b"/a", b"q" * (8 * 1024 - 2))
    assert refusal is not None and refusal.status == 414


@pytest.mark.parametrize("headers", [
    [(b"x-big", b"a" * (16 << 20))],  # the issue's 16 MB header
    [(b"x-big", b"a" * (16 * 1024 - 8))],  # one byte over, counting "name: value\r\n"
    [(b"x-%d" % i, b"v") for i in range(2000)],  # many small ones
])
def test_request_headers_over_16k_are_431(headers: list[tuple[bytes, bytes]]) -> None:
    refusal = check_request_head(headers, b"/")
    assert refusal is not None
    assert (refusal.status, refusal.code) == (431, "request_header_fields_too_large")


# ------------------------------------------------------------------ JSON nesting
def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def test_max_depth_counts_arrays_and_objects() -> None:
    assert [max_depth(v) for v in (1, "x", None, [], {}, [[]], {"a": {"b": [1]}})] == \
        [0, 0, 0, 1, 1, 2, 3]
    deep: list[Any] = []
    for _ in range(100_000):  # far beyond the recursion limit: still answered
        deep = [deep]
    assert max_depth(deep) == 100_001


def test_depth_exceeds_stops_on_a_cycle() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert depth_exceeds(loop, 32)


@pytest.mark.parametrize(("raw", "depth"), [
    ("1", 0), ("[]", 1), ("{}", 1), ('{"a": [1, {"b": []}]}', 4),
    ('["[[[[[[", "{{{{{{"]', 1),
    ('["\\"[[[[[[", 1]', 1),  # an escaped quote does not end the string
    ('["\\\\", [[[]]]]', 4),  # an escaped backslash does not escape the quote
    ('["\\u0022[[[["]', 1),
    ('{"k[": {"k{": ["]"]}}', 3),
])
def test_json_depth_exceeds_ignores_brackets_in_strings(raw: str, depth: int) -> None:
    assert max_depth(json.loads(raw)) == depth
    assert json_depth_exceeds(raw.encode(), depth) is False
    if depth:
        assert json_depth_exceeds(raw, depth - 1)


def test_a_body_nested_100k_deep_never_reaches_the_parser() -> None:
    raw = nested(100_000).encode()
    with pytest.raises(RecursionError):
        json.loads(raw)  # what the routes did before: a 500
    assert json_depth_exceeds(raw)
    with pytest.raises(JsonTooDeep) as caught:
        loads_bounded(raw)
    assert caught.value.limit == JSON_MAX_DEPTH and "32" in str(caught.value)
    with pytest.raises(JsonTooDeep):
        loads_bounded('{"metadata": ' + nested(255, "{}") + "}")


def test_the_limit_is_32_levels() -> None:
    assert loads_bounded(nested(32)) == json.loads(nested(32))
    with pytest.raises(JsonTooDeep):
        loads_bounded(nested(33))
    assert loads_bounded(nested(3), limit=3) and not json_depth_exceeds(nested(3), 3)


@pytest.mark.parametrize("raw", [
    b"", b" ", b"[", b"]", b"{]", b'{"a"}', b"[1,]", b"NaN", b"[Infinity]", b"[-Infinity]",
    b"1e400", b'"\\ud800"', b'["\\x"]', b"\xff", b'"\xc3\x28"', b"\xef\xbb\xbf[]",
    b"\xff\xfe[\x00]\x00", b"[1] [2]", b"'a'", b"[01]", b'"\x01"',
])
def test_invalid_json_raises_json_invalid(raw: bytes) -> None:
    with pytest.raises(JsonInvalid):
        loads_bounded(raw)


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=30)


@st.composite
def deep_json(draw: st.DrawFn) -> Any:
    """A random value wrapped in 0-60 random layers, to cross the limit either way."""
    value = draw(JSON_VALUES)
    for wrap_in_object in draw(st.lists(st.booleans(), max_size=60)):
        value = {draw(st.text(max_size=4)): value} if wrap_in_object else [value]
    return value


@settings(max_examples=300, deadline=None)
@given(deep_json(), st.booleans(), st.integers(0, 40))
def test_json_depth_exceeds_agrees_with_max_depth_on_valid_json(
        value: Any, ascii_only: bool, limit: int) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only)
    assert json_depth_exceeds(raw.encode(), limit) == (max_depth(json.loads(raw)) > limit)


@settings(max_examples=300, deadline=None)
@given(deep_json())
def test_loads_bounded_returns_the_value_or_refuses_it_as_too_deep(value: Any) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode()
    if max_depth(value) > JSON_MAX_DEPTH:
        with pytest.raises(JsonTooDeep):
            loads_bounded(raw)
    else:
        assert loads_bounded(raw) == value


JSONISH_BYTES = st.lists(st.sampled_from(
    [b"[", b"]", b"{", b"}", b'"', b"\\", b",", b":", b"1", b"-", b"e", b" ", b"null",
     b"\xff", b"\xc3", b"\x00", b'"a"', b"\\u", b"d800"]), max_size=200).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200) | JSONISH_BYTES | st.text(max_size=100).map(str.encode),
       st.sampled_from([0, 1, 2, 4, JSON_MAX_DEPTH]))
def test_random_bytes_give_a_value_or_a_specific_error(raw: bytes, limit: int) -> None:
    try:
        value = loads_bounded(raw, limit)
    except (JsonTooDeep, JsonInvalid):
        return
    assert max_depth(value) <= limit


@settings(deadline=None)
@given(st.integers(33, 5000), st.sampled_from(["[", "{\"a\":"]), st.binary(max_size=20))
def test_deep_garbage_is_too_deep_or_invalid_never_recursion(
        depth: int, opener: str, tail: bytes) -> None:
    raw = (opener * depth).encode() + tail
    with pytest.raises((JsonTooDeep, JsonInvalid)):
        loads_bounded(raw)


# ------------------------------------------------------------------ canonical JSON
def test_canonical_json_is_sorted_compact_utf8() -> None:
    value = {"b": 1, "a": [1.5, {"d": None, "c": "\u00e9\u4e2d"}], "A": True}
    assert canonical_json(value) == \
        '{"A":true,"a":[1.5,{"c":"\u00e9\u4e2d","d":null}],"b":1}'.encode()


def test_canonical_json_keeps_ints_and_floats_apart() -> None:
    assert canonical_json({"n": 1}) != canonical_json({"n": 1.0})
    assert canonical_json([True, 1]) == b"[true,1]"
    assert canonical_json(10**30) == b"1" + b"0" * 30
    assert canonical_json(0.1) == b"0.1"


@pytest.mark.parametrize("value", [
    float("nan"), [float("inf")], {"k": object()}, {1: "a"}, {"a": {None: 1}}, "\ud800",
    Decimal("1.5"), b"x",
])
def test_canonical_json_refuses_what_is_not_json(value: object) -> None:
    with pytest.raises(JsonInvalid):
        canonical_json(value)


def test_canonical_json_refuses_deep_values_without_recursing() -> None:
    deep: Any = {}
    for _ in range(100_000):
        deep = {"m": deep}
    with pytest.raises(JsonTooDeep):
        body_hash(deep)
    with pytest.raises(JsonTooDeep):  # the issue's 255-level metadata
        body_hash({"metadata": json.loads(nested(255, "{}"))})


@st.composite
def value_and_reordered(draw: st.DrawFn) -> tuple[Any, Any]:
    value = draw(deep_json().filter(lambda v: max_depth(v) <= JSON_MAX_DEPTH))
    rnd = draw(st.randoms(use_true_random=False))

    def shuffle(node: Any) -> Any:
        if isinstance(node, dict):
            items = list(node.items())
            rnd.shuffle(items)
            return {k: shuffle(v) for k, v in items}
        if isinstance(node, list):
            return [shuffle(v) for v in node]
        return node

    return value, shuffle(value)


@settings(max_examples=300, deadline=None)
@given(value_and_reordered())
def test_body_hash_ignores_key_order(pair: tuple[Any, Any]) -> None:
    value, reordered = pair
    assert body_hash(value) == body_hash(reordered)
    assert canonical_json(value) == canonical_json(reordered)
    assert json.loads(canonical_json(value)) == value


@settings(max_examples=300, deadline=None)
@given(value_and_reordered())
def test_validated_body_hash_is_body_hash(pair: tuple[Any, Any]) -> None:
    value, reordered = pair
    assert validated_body_hash(value) == body_hash(value) == validated_body_hash(reordered)


def test_validated_body_hash_keeps_the_digests_already_stored() -> None:
    # Digests of these bodies as body_hash computed them before validated_body_hash existed:
    # a retry with a key stored then must still match, not get idempotency_key_reused.
    start = StartGenerationBody.model_validate(
        {"user_id": "b-1", "prompt": "bench banner \u00e9\u4e2d", "format": "instagram_post",
         "sample_count": 4, "metadata": {"z": 1, "a": [1.5, None, True]}},
        context={"input_asset_hosts": ()})
    selection = SelectionBody.model_validate({"sample_id": "s1", "resolution": "high"})
    assert validated_body_hash(start.model_dump(mode="json")) == \
        "cf621e2e9293f45d23dc101585791f9f0326e5da22b55956a2f6352f4b1f9865"
    assert validated_body_hash(selection.model_dump(mode="json")) == \
        "073553139d5c56df9f132a5b1972e96129a6ae912dd60c5f479817078e57f3e4"


def test_body_hash_tells_different_bodies_apart() -> None:
    base = {"user_id": "u-42", "metadata": {"a": 1, "b": 2}}
    assert body_hash(base) == body_hash({"metadata": {"b": 2, "a": 1}, "user_id": "u-42"})
    assert body_hash(base) != body_hash({"user_id": "u-42", "metadata": {"a": 1, "b": 3}})
    assert body_hash(base) != body_hash({"user_id": "u-42", "metadata": {"a": "1", "b": 2}})
    assert len(body_hash(base)) == 64
