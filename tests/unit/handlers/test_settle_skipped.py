"""A credit step whose hold is no longer open (``settle()`` returns False) is not claimed.

Someone settled the hold outside the saga (support by hand, a repair script, a late reaper).
The saga goes on — the user still gets the result or the cancellation — but its history
records a ``note`` saying the step was skipped instead of a ``credit`` step that did not
happen, and its credit summary counts only what it moved.
"""

from __future__ import annotations

from datetime import UTC, datetime

from persistence.ledger import SqlLedger
from saga.commands import Cancel
from tests.conftest import World
from tests.unit.handlers.helpers import (
    SAMPLES_READY,
    account,
    credit_ops,
    events,
    fund,
    hold_rows,
    one_job,
    result,
    start,
)

OUTSIDE = datetime(2026, 11, 2, 12, 0, 30, tzinfo=UTC)


def settle_outside_the_saga(world: World, *, commit: bool) -> str:
    (row,) = [r for r in hold_rows(world) if r.status == "open"]
    with world.engine.begin() as conn:
        assert SqlLedger(conn).settle(row.hold_id, commit=commit, at=OUTSIDE)
    return str(row.hold_id)


def skipped_notes(world: World, gen_id: str) -> list[dict[str, object]]:
    return [e["detail"] for e in events(world, gen_id, "note")
            if "credit_skipped" in e["detail"]]


def test_a_commit_of_a_hold_released_elsewhere_is_noted_not_claimed(world: World) -> None:
    fund(world)
    gen = start(world)
    job = one_job(world)
    hold_id = settle_outside_the_saga(world, commit=False)

    assert result(world, gen["id"], job["job_id"], SAMPLES_READY) == "applied"

    after = world.queries.get(gen["id"])
    assert after["state"] == "awaiting_selection"
    assert credit_ops(world, gen["id"]) == [("reserve", "samples", "0.25")]
    assert skipped_notes(world, gen["id"]) == [
        {"credit_skipped": "commit", "hold_id": hold_id, "amount": "0.25", "stage": "samples",
         "reason": "hold_not_open"}]
    assert after["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.00"}
    assert account(world)["balance"] == "10.00"  # nobody charged the user


def test_a_release_of_a_hold_committed_elsewhere_is_noted_not_claimed(world: World) -> None:
    fund(world)
    gen = start(world)
    one_job(world)
    hold_id = settle_outside_the_saga(world, commit=True)

    after = world.bus.handle(Cancel(gen["id"]))

    assert after["state"] == "cancelled"
    assert credit_ops(world, gen["id"]) == [("reserve", "samples", "0.25")]
    assert skipped_notes(world, gen["id"]) == [
        {"credit_skipped": "release", "hold_id": hold_id, "amount": "0.25",
         "stage": "samples", "reason": "hold_not_open"}]
    assert world.queries.get(gen["id"])["credits"] == {"held": "0.00", "charged": "0.00",
                                                       "released": "0.00"}
