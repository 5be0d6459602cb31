"""``validated_body_hash`` (orjson for plain JSON trees) gives ``json.dumps``' digest, always.

The oracle is the digest of :func:`saga.input_policy._canonical_bytes` (``json.dumps`` with
sorted keys), the only path before the orjson one: a stored Idempotency-Key must keep
matching its request, and what was refused must stay refused with the same reason.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saga.input_policy import JsonInvalid, _canonical_bytes, _plain_json, validated_body_hash


def _oracle(value: object) -> str | tuple[type[BaseException], str]:
    try:
        return hashlib.sha256(_canonical_bytes(value)).hexdigest()
    except (JsonInvalid, RecursionError) as exc:
        return type(exc), str(exc)


def _fast(value: object) -> str | tuple[type[BaseException], str]:
    try:
        return validated_body_hash(value)
    except (JsonInvalid, RecursionError) as exc:
        return type(exc), str(exc)


SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2**64, 2**64)
           | st.text() | st.text(st.characters(codec=None, categories=["Cc", "Cs", "Zl"]))
           | st.floats() | st.sampled_from([1e16, 1e-5, 0.1, 1.0, -0.0, 1e300, float("nan")]))
KEYS = st.text() | st.sampled_from(["", "é", "\u2028", "\U0001f600", "Z", "a", "\x00"])
TREES = st.recursive(
    SCALARS,
    lambda children: (st.lists(children, max_size=4)
                      | st.lists(children, max_size=3).map(tuple)
                      | st.dictionaries(KEYS, children, max_size=4)
                      | st.dictionaries(st.integers() | st.none(), children, max_size=2)),
    max_leaves=24)


@settings(max_examples=1000, deadline=None)
@given(TREES)
def test_the_orjson_path_writes_the_json_dumps_digest(value: Any) -> None:
    assert _fast(value) == _oracle(value)


@pytest.mark.parametrize("value", [
    {"user_id": "b-1", "prompt": "bench banner", "format": {"name": "instagram_post"},
     "sample_count": 4, "project_id": None, "style": {}, "input_assets": [], "metadata": {}},
    {"b": 1, "a": [True, False, None, "x\"\\\n\t\x01\x7f\u2028"], "é": {"z": 2**64 - 1}},
    {"big": 2**64}, {"neg": -(2**63)}, {"s": "\ud800"}, {"f": 1.5}, {"n": float("inf")},
    {1: "a"}, [("a", 1)], [],
])
def test_known_bodies(value: Any) -> None:
    assert _fast(value) == _oracle(value)


def test_only_exact_plain_types_take_the_orjson_path() -> None:
    class Text(str):
        pass

    assert _plain_json({"a": [1, "x", None, True, {"b": []}]})
    for value in ({"a": 1.0}, {"a": (1,)}, {1: "a"}, {Text("a"): 1}, {"a": Text("x")}, 1.5,
                  [{"a": [0.5]}]):
        assert not _plain_json(value), value
