"""Credits on the SQLite tier: refused starts, plans, the free quota."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from saga.commands import (
    Cancel,
    Regenerate,
    SelectSample,
    SetPlan,
)
from saga.errors import InsufficientCredits, QuotaExceeded, UnknownSample
from tests.conftest import World
from tests.unit.handlers.helpers import (
    FINAL_READY,
    account,
    credit_ops,
    events,
    fund,
    hold_rows,
    rejections,
    result,
    snapshot,
    start,
    to_awaiting,
    to_final,
)


# ------------------------------------------------------------------ start refusals (§2)
def assert_nothing_persisted(world: World) -> None:
    items, _ = world.queries.list_generations(user_id=None, state=None, limit=10, after=None)
    assert items == []
    assert world.jobs() == [] and world.broker.published == []
    assert hold_rows(world) == []


def test_start_without_account_is_refused(world: World) -> None:
    """No account → InsufficientCredits (402); nothing persisted, nothing dispatched."""
    with pytest.raises(InsufficientCredits):
        start(world)
    assert_nothing_persisted(world)


def test_start_with_too_little_balance_is_refused(world: World) -> None:
    fund(world, amount="0.24")
    with pytest.raises(InsufficientCredits):
        start(world)
    assert_nothing_persisted(world)
    assert account(world) == {"user_id": "u-1", "plan": "free", "balance": "0.24",
                              "held": "0.00", "available": "0.24"}


def test_start_counts_open_holds_against_the_balance(world: World) -> None:
    """available = balance - open holds: two rounds fit in 0.50, the third does not."""
    fund(world, amount="0.50")
    start(world)
    start(world)
    with pytest.raises(InsufficientCredits):
        start(world)
    assert account(world)["available"] == "0.00"


def use_rounds(world: World, n: int, user: str = "u-1") -> list[dict[str, Any]]:
    gens = [start(world, user) for _ in range(n)]
    world.jobs()
    return gens


def test_free_quota_counts_regenerations_and_not_released_rounds(world: World) -> None:
    """Free plan: at most 100 sample rounds per month; regenerations count, released
    rounds don't (docs/api.md, credits)."""
    fund(world, amount="50.00")
    gen, _ = to_awaiting(world)
    world.bus.handle(Regenerate(gen["id"]))  # round 2 of the month
    gens = use_rounds(world, 98)  # rounds 3..100
    assert len([r for r in hold_rows(world) if r.stage == "samples"]) == 100

    before = account(world)
    with pytest.raises(QuotaExceeded):
        start(world)
    assert account(world) == before and world.jobs() == []

    # releasing a round frees a slot, committing one does not
    world.bus.handle(Cancel(gens[0]["id"]))
    start(world)
    with pytest.raises(QuotaExceeded):
        start(world)


def test_free_quota_refuses_a_regeneration(world: World) -> None:
    fund(world, amount="50.00")
    gen, _ = to_awaiting(world)
    use_rounds(world, 99)
    before = snapshot(world, gen["id"])
    with pytest.raises(QuotaExceeded):
        world.bus.handle(Regenerate(gen["id"]))
    assert snapshot(world, gen["id"]) == before
    assert rejections(world, gen["id"]) == ["quota_exceeded"]


def test_free_quota_resets_with_the_utc_month(world: World) -> None:
    fund(world, amount="50.00")
    use_rounds(world, 100)
    world.clock.now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    with pytest.raises(QuotaExceeded):
        start(world)
    world.clock.now = datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC)
    assert start(world)["state"] == "processing_samples"


def test_pro_plan_has_no_monthly_quota(world: World) -> None:
    fund(world, amount="1.00", plan="pro")
    gens = use_rounds(world, 101)
    assert all(g["state"] == "processing_samples" for g in gens)
    assert account(world)["balance"] == "1.00"


# ------------------------------------------------------------------ plans (§2)
def test_pro_plan_waives_samples_and_standard_final(world: World) -> None:
    """pro pays nothing for samples or a standard final: op ``waived``, no hold."""
    fund(world, amount="5.00", plan="pro")
    gen, job = to_final(world, "standard")
    assert gen["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.00"}
    waived = events(world, gen["id"], "credit")
    assert [(e["detail"]["op"], e["detail"]["stage"], e["detail"]["hold_id"],
             e["detail"]["amount"]) for e in waived] == [
        ("waived", "samples", None, "0.00"), ("waived", "final", None, "0.00")]
    assert hold_rows(world) == []
    assert result(world, gen["id"], job["job_id"], FINAL_READY) == "applied"
    assert world.queries.get(gen["id"])["credits"] == {"held": "0.00", "charged": "0.00",
                                                       "released": "0.00"}
    assert account(world)["balance"] == "5.00"


def test_pro_plan_pays_for_a_high_resolution_final(world: World) -> None:
    fund(world, amount="5.00", plan="pro")
    gen, job = to_final(world, "high")
    assert gen["credits"]["held"] == "2.00"
    assert account(world)["available"] == "3.00"
    assert result(world, gen["id"], job["job_id"], FINAL_READY) == "applied"
    assert world.queries.get(gen["id"])["credits"] == {"held": "0.00", "charged": "2.00",
                                                       "released": "0.00"}
    assert credit_ops(world, gen["id"]) == [("waived", "samples", "0.00"),
                                            ("reserve", "final", "2.00"),
                                            ("commit", "final", "2.00")]
    assert account(world) == {"user_id": "u-1", "plan": "pro", "balance": "3.00",
                              "held": "0.00", "available": "3.00"}


def test_pro_account_without_balance_cannot_select_high(world: World) -> None:
    world.bus.handle(SetPlan("u-1", "pro"))
    gen, _ = to_awaiting(world)
    before = snapshot(world, gen["id"])
    with pytest.raises(InsufficientCredits):
        world.bus.handle(SelectSample(gen["id"], "s1", "high"))
    assert snapshot(world, gen["id"]) == before
    assert rejections(world, gen["id"]) == ["insufficient_credits"]


def test_select_of_an_unknown_sample_is_refused_and_recorded(world: World) -> None:
    fund(world)
    gen, _ = to_awaiting(world)
    before = snapshot(world, gen["id"])
    with pytest.raises(UnknownSample):
        world.bus.handle(SelectSample(gen["id"], "s7", "standard"))
    assert snapshot(world, gen["id"]) == before
    (rejected,) = events(world, gen["id"], "rejected")
    assert rejected["actor"] == "odoo" and rejected["detail"]["reason"] == "unknown_sample"
