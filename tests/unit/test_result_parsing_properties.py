"""``parse_result`` on anything a producer could send: a command or a dead-letter reason.

Random bytes, random JSON, recursive JSON nested far beyond the 32-level limit (and beyond
Python's recursion limit), and valid results with random noise: it must never raise.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from messaging.consumer import parse_result
from saga.commands import ApplyResult

REASONS = ("too_large", "not_json", "schema")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=40)


def check(body: bytes) -> ApplyResult | str:
    out = parse_result(body)
    assert isinstance(out, ApplyResult) or (isinstance(out, str)
                                            and out.split(":")[0] in REASONS), out
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes(body: bytes) -> None:
    check(body)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json(value: Any) -> None:
    check(json.dumps(value).encode())


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["[", '{"a":']),
       st.booleans())
def test_recursive_json_of_any_depth(depth: int, opener: str, closed: bool) -> None:
    closer = "]" if opener == "[" else "}"
    body = (opener * depth + "1" + (closer * depth if closed else "")).encode()
    out = check(body)
    if depth > 32:
        assert isinstance(out, str) and out.startswith(("schema", "not_json"))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["AIGenerationSamplesReady", "AIGenerationFinalAssetReady",
                        "AIGenerationFailed", "AIGenerationProgress", "Other"]),
       st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_results_with_random_fields(event_type: str, noise: dict[str, Any]) -> None:
    check(json.dumps({"event_type": event_type, "generation_id": "g", "job_id": "j",
                      **noise}).encode())


def test_a_valid_result_still_parses() -> None:
    body = json.dumps({"event_type": "AIGenerationProgress", "generation_id": "g",
                       "job_id": "j", "percent": 40}).encode()
    assert isinstance(check(body), ApplyResult)
