"""``saga.model.new_id``: canonical version 7 UUID text (RFC 9562), time-ordered.

The ids key the biggest indexes (generations, their history, holds, inbox keys). Random
version 4 ids put every new row on a random leaf page of those indexes: on tables holding a
million generations that was some 14 buffer reads a generation that the cache could not
keep. Time-ordered ids put new rows at the indexes' right edge.
"""

from __future__ import annotations

import re
import time
import uuid

from saga.model import new_id

CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def unix_ms(value: str) -> int:
    return uuid.UUID(value).int >> 80


def test_ids_are_canonical_uuid7_text_with_the_random_bits_random() -> None:
    ids = [new_id() for _ in range(4000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        assert CANONICAL.fullmatch(value), value
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    # every random position takes every hex digit; the variant digit all four of 8 9 a b
    for position in (15, 16, 20, 25, 35):
        assert {v[position] for v in ids} == set("0123456789abcdef"), position
    assert {v[19] for v in ids} == set("89ab")


def test_ids_carry_their_creation_time_and_sort_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_id()
    time.sleep(0.003)
    second = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= unix_ms(first) < unix_ms(second) <= after
    assert first < second  # text order is time order, to the millisecond
