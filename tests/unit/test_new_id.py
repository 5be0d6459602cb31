"""``saga.model.new_id`` spells what ``str(uuid.uuid4())`` spells: a random version 4 UUID."""

from __future__ import annotations

import re
import uuid

from saga.model import new_id

CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_ids_are_canonical_random_uuid4_text() -> None:
    ids = [new_id() for _ in range(4000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        assert CANONICAL.fullmatch(value), value
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # every random position takes every hex digit; the variant digit all four of 8 9 a b
    for position in (0, 9, 15, 20, 35):
        assert {v[position] for v in ids} == set("0123456789abcdef"), position
    assert {v[19] for v in ids} == set("89ab")
