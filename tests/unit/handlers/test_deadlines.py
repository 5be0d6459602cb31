"""Deadlines on the SQLite tier: stage timeouts, retries due, the selection window."""

from __future__ import annotations

from datetime import timedelta

import pytest

from saga.commands import (
    FireDeadlines,
    SelectSample,
)
from saga.errors import InvalidState
from tests.conftest import World
from tests.unit.handlers.helpers import (
    FINAL_READY,
    SAMPLES_READY,
    account,
    events,
    fund,
    iso_z,
    notification_types,
    one_job,
    result,
    start,
    to_awaiting,
    to_final,
)


# ------------------------------------------------------------------ deadlines (§5)
def test_samples_deadline_times_out_and_releases(world: World) -> None:
    fund(world)
    gen = start(world)
    job = one_job(world)
    assert gen["deadline_at"] == iso_z(world.clock.now + timedelta(seconds=120))
    world.clock.advance(119)
    assert world.bus.handle(FireDeadlines()) == 0
    world.clock.advance(1)
    assert world.bus.handle(FireDeadlines()) == 1
    view = world.queries.get(gen["id"])
    assert view["state"] == "timed_out" and view["deadline_at"] is None
    assert view["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    assert world.bus.handle(FireDeadlines()) == 0  # fires once
    # a late result is refused and never charged
    assert result(world, gen["id"], job["job_id"], SAMPLES_READY) == "wrong_state"
    assert account(world)["balance"] == "10.00"
    assert world.queries.get(gen["id"])["credits"]["charged"] == "0.00"
    assert notification_types(world) == ["timed_out"]


def test_final_deadline_returns_to_selection(world: World) -> None:
    fund(world)
    gen, job = to_final(world)
    world.clock.advance(600)
    assert world.bus.handle(FireDeadlines()) == 1
    view = world.queries.get(gen["id"])
    assert view["state"] == "awaiting_selection"
    assert view["error"]["code"] == "final_timed_out"
    assert view["credits"] == {"held": "0.00", "charged": "0.25", "released": "1.00"}
    assert view["deadline_at"] == iso_z(world.clock.now + timedelta(hours=24))
    assert notification_types(world) == ["samples_ready", "final_timed_out"]
    # the late final is refused and never charged
    assert result(world, gen["id"], job["job_id"], FINAL_READY) == "wrong_state"
    assert account(world)["balance"] == "9.75"


def test_late_final_after_reselection_is_stale(world: World) -> None:
    fund(world)
    gen, old = to_final(world)
    world.clock.advance(600)
    world.bus.handle(FireDeadlines())
    world.bus.handle(SelectSample(gen["id"], "s3", "standard"))
    new = one_job(world)
    assert result(world, gen["id"], old["job_id"], FINAL_READY) == "stale_job"
    assert world.queries.get(gen["id"])["state"] == "processing_final"
    assert result(world, gen["id"], new["job_id"], FINAL_READY) == "applied"
    assert world.queries.get(gen["id"])["credits"] == {"held": "0.00", "charged": "1.25",
                                                       "released": "1.00"}
    assert account(world)["balance"] == "8.75"


def test_selection_window_expires(world: World) -> None:
    fund(world)
    gen, _ = to_awaiting(world)
    world.clock.advance(24 * 3600 - 1)
    assert world.bus.handle(FireDeadlines()) == 0
    world.clock.advance(1)
    assert world.bus.handle(FireDeadlines()) == 1
    view = world.queries.get(gen["id"])
    assert view["state"] == "expired" and view["deadline_at"] is None
    assert view["credits"] == {"held": "0.00", "charged": "0.25", "released": "0.00"}
    assert notification_types(world) == ["samples_ready", "expired"]
    with pytest.raises(InvalidState):
        world.bus.handle(SelectSample(gen["id"], "s1", "standard"))


def test_timeout_is_recorded_with_the_timer_actor(world: World) -> None:
    fund(world)
    gen = start(world)
    world.clock.advance(120)
    world.bus.handle(FireDeadlines())
    last = events(world, gen["id"], "transition")[-1]
    assert (last["trigger"], last["actor"], last["from_state"], last["to_state"]) == (
        "timeout", "timer", "processing_samples", "timed_out")
