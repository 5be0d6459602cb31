"""Cancel and regenerate on the SQLite tier."""

from __future__ import annotations

import pytest

from saga.commands import (
    Cancel,
    Regenerate,
)
from saga.errors import InvalidState
from tests.conftest import World
from tests.unit.handlers.helpers import (
    FAILED,
    FINAL_READY,
    SAMPLES_READY,
    account,
    events,
    fund,
    hold_rows,
    notification_types,
    one_job,
    rejections,
    result,
    snapshot,
    start,
    to_awaiting,
    to_final,
)


# ------------------------------------------------------------------ cancel / regenerate
@pytest.mark.parametrize(("where", "credits", "balance"), [
    ("processing_samples", {"held": "0.00", "charged": "0.00", "released": "0.25"}, "10.00"),
    ("awaiting_selection", {"held": "0.00", "charged": "0.25", "released": "0.00"}, "9.75"),
    ("processing_final", {"held": "0.00", "charged": "0.25", "released": "1.00"}, "9.75"),
])
def test_cancel_releases_what_is_held(world: World, where: str, credits: dict[str, str],
                                      balance: str) -> None:
    fund(world)
    if where == "processing_samples":
        gen = start(world)
        job = one_job(world)
    elif where == "awaiting_selection":
        gen, job = to_awaiting(world)
    else:
        gen, job = to_final(world)
    view = world.bus.handle(Cancel(gen["id"], reason="user changed mind"))
    assert view["state"] == "cancelled" and view["credits"] == credits
    assert account(world) == {"user_id": "u-1", "plan": "free", "balance": balance,
                              "held": "0.00", "available": balance}
    event_type = {"processing_samples": SAMPLES_READY, "awaiting_selection": FAILED,
                  "processing_final": FINAL_READY}[where]
    assert result(world, gen["id"], job["job_id"], event_type) == "wrong_state"
    assert world.queries.get(gen["id"])["credits"] == credits
    assert account(world)["balance"] == balance
    assert notification_types(world)[-1] == "cancelled"


def test_cancel_of_a_terminal_saga_is_refused_and_recorded(world: World) -> None:
    fund(world)
    gen = start(world)
    world.bus.handle(Cancel(gen["id"]))
    before = snapshot(world, gen["id"])
    with pytest.raises(InvalidState):
        world.bus.handle(Cancel(gen["id"]))
    assert snapshot(world, gen["id"]) == before
    (rejected,) = events(world, gen["id"], "rejected")
    assert rejected["actor"] == "odoo"
    assert rejected["detail"]["reason"] == "invalid_state"


def test_regenerate_holds_a_new_round(world: World) -> None:
    fund(world)
    gen, first = to_awaiting(world)
    view = world.bus.handle(Regenerate(gen["id"], prompt="autumn sale"))
    assert view["state"] == "processing_samples" and view["samples"] == []
    assert view["credits"] == {"held": "0.25", "charged": "0.25", "released": "0.00"}
    job = one_job(world)
    assert job["job_id"] != first["job_id"] and job["attempt"] == 1
    assert job["stage"] == "samples" and job["prompt"] == "autumn sale"
    assert account(world)["available"] == "9.50"
    sample_holds = [r for r in hold_rows(world) if r.stage == "samples"]
    assert sorted(r.status for r in sample_holds) == ["committed", "open"]
    assert result(world, gen["id"], job["job_id"], SAMPLES_READY) == "applied"
    assert world.queries.get(gen["id"])["credits"]["charged"] == "0.50"


def test_regenerate_is_only_allowed_while_awaiting_selection(world: World) -> None:
    fund(world)
    gen = start(world)
    with pytest.raises(InvalidState):
        world.bus.handle(Regenerate(gen["id"]))
    assert account(world)["held"] == "0.25"
    assert rejections(world, gen["id"]) == ["invalid_state"]
