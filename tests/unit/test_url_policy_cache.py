"""The cached URL checks answer exactly what the uncached whole-URL parse answers.

:func:`saga.input_policy.check_result_url` and :func:`~saga.input_policy.check_odoo_url`
parse a URL's authority once per distinct (scheme, authority) and cache the decision; the
oracle (``url_policy_reference``) parses every URL whole, as the module did before. Any URL,
first seen or answered from the cache, must get the same verdict, word for word.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga import input_policy as ip
from tests.unit import url_policy_reference as ref

SCHEMES = ["s3", "https", "http", "S3", "HTTPS", "Http", "ftp", "file", "h", "", "s3+x"]
SEPARATORS = ["://", ":///", "://", ":/", ":", "//", "://"]
# Characters that matter to one parser or another in an authority, plus a few that do not.
AUTHORITY_CHARS = [*"abcxyz019AZ.-_:[]@%v", "\uff10", "\u3002", "\u00e9", "\u212a", "\u00df",
                   " ", "\\", "\t", "\x00"]
HOSTS = [
    "creativeflow-assets", "cdn.example.com", "localhost", "minio", "10.0.0.1", "127.1",
    "0x7f.1", "2130706433", "8.8.8.8", "8.8.8.8.", "[::1]", "[::ffff:10.0.0.1]",
    "[2002:a00:1::1]", "[fe80::1]", "[2606:4700::1111]", "[v1.x]", "[::::]", "[1.2.3.4]",
    "[::1", "::1]", "xn--nxasmq6b.com", "xn--a.com", "a..b", "-a.com", "a" * 64 + ".com",
    "192.168.1.1.nip.io", "bucket.with.dots", "1.2.3", "ab", "a_b.example", "A.EXAMPLE",
    "my.local", "svc.cluster.svc", "[::1]x", "",
]
PORTS = ["", ":", ":0", ":80", ":443", ":65535", ":65536", ":8a", ":\uff18", "::80",
         ":99999999999999999999"]
TAILS = ["", "/", "/a.png", "?x=1", "#f", "/a/../b", "/%zz", "/\u00e9", "/a b", "/a\\b",
         "/@evil", "/[x]", "/?a=@#b", "//x", "/" + "p" * 2100]
ALLOWED = [(), ("minio",), ("[::1]",), ("LOCALHOST", "10.0.0.1"), ("::1",)]


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(SCHEMES))
    sep = draw(st.sampled_from(SEPARATORS))
    if draw(st.booleans()):
        authority = draw(st.sampled_from(HOSTS)) + draw(st.sampled_from(PORTS))
    else:
        authority = draw(st.text(st.sampled_from(AUTHORITY_CHARS), max_size=24))
    if draw(st.booleans()):
        authority = draw(st.sampled_from(["", "user@", "u:p@", "@"])) + authority
    tail = draw(st.sampled_from(TAILS)) + draw(st.text(max_size=12))
    return scheme + sep + authority + tail


def _verdicts(url: object, allowed: tuple[str, ...]) -> tuple[object, ...]:
    return (ip.check_result_url(url), ip.check_result_url(url, allow_http=True),
            ip.check_odoo_url(url, allowed))


def _reference(url: object, allowed: tuple[str, ...]) -> tuple[object, ...]:
    return (ref.check_result_url(url), ref.check_result_url(url, allow_http=True),
            ref.check_odoo_url(url, allowed))


@settings(deadline=None, max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(urls(), st.text(max_size=40)), st.sampled_from(ALLOWED))
def test_cached_url_checks_agree_with_the_uncached_parse(url: str,
                                                          allowed: tuple[str, ...]) -> None:
    expected = _reference(url, allowed)
    assert _verdicts(url, allowed) == expected, url  # first seen (or cached by an earlier one)
    assert _verdicts(url, allowed) == expected, url  # answered from the cache


@settings(deadline=None)
@given(urls(), st.sampled_from(TAILS))
def test_a_cached_authority_does_not_excuse_a_bad_rest_of_the_url(url: str, tail: str) -> None:
    """The cache is keyed by scheme and authority: what differs after it is checked anew."""
    ip.check_result_url(url)
    ip.check_odoo_url(url)
    for variant in (url + tail, url + "\x00", url + " x", url + "\\"):
        assert ip.check_result_url(variant) == ref.check_result_url(variant), variant
        assert ip.check_odoo_url(variant) == ref.check_odoo_url(variant), variant


@pytest.mark.parametrize("url", [
    "s3://creativeflow-assets/users/u/generations/g/samples/s1.png",
    "https://cdn.example.com/a.png", "http://localhost:9000/b/a.png", "https://10.0.0.1/a",
    "https://[::1]/a", "s3://192.168.1.1/a", "https://127.1/a", "s3://[::1/x",
    "https://user@cdn.example.com/", "https://cdn.example.com:0/", "HTTPS://CDN.example.com/",
])
def test_known_urls_agree(url: str) -> None:
    for allowed in ALLOWED:
        assert _verdicts(url, allowed) == _reference(url, allowed)
        assert _verdicts(url, allowed) == _reference(url, allowed)


def test_non_strings_agree() -> None:
    for value in (None, 1, b"https://cdn.example.com/", ["s3://b/a"]):
        assert _verdicts(value, ()) == _reference(value, ())
