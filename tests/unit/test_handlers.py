"""The real command handlers (through ``MessageBus``) on SQLite with the in-process broker.

Covers contract §1 (saga rules), §2 (credits, plans, quota), the history rules of §3 and the
message shapes of §4. Time is driven by ``world.clock`` and ``bus.handle(FireDeadlines())``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from persistence.tables import holds, journal
from saga.commands import (
    ApplyResult,
    Cancel,
    FireDeadlines,
    Grant,
    Regenerate,
    SelectSample,
    SetPlan,
    StartGeneration,
)
from saga.errors import InsufficientCredits, InvalidState, QuotaExceeded, UnknownSample
from tests.conftest import World

FORMAT = {"name": "instagram_story", "width": 1080, "height": 1920}
NOTIFICATIONS = "creativeflow.notifications"
EVENTS = "creativeflow.events"
SAMPLES_READY = "AIGenerationSamplesReady"
FINAL_READY = "AIGenerationFinalAssetReady"
FAILED = "AIGenerationFailed"
PROGRESS = "AIGenerationProgress"
RETRYABLE = {"code": "model_unavailable", "message": "busy", "retryable": True}
FATAL = {"code": "model_unavailable", "message": "broken", "retryable": False}


# ------------------------------------------------------------------ helpers
def sample_list(n: int = 4) -> list[dict[str, Any]]:
    return [{"sample_id": f"s{i}", "url": f"s3://creativeflow-assets/k/s{i}.png",
             "width": 512, "height": 512} for i in range(1, n + 1)]


ASSET = {"url": "s3://creativeflow-assets/k/final.png", "width": 1152, "height": 2048,
         "format": "png"}


def fund(world: World, user: str = "u-1", amount: str = "10.00",
         plan: str | None = None) -> None:
    if plan is not None:
        world.bus.handle(SetPlan(user, plan))
    world.bus.handle(Grant(user, Decimal(amount), "test"))


def start(world: World, user: str = "u-1", **kw: Any) -> dict[str, Any]:
    return world.bus.handle(StartGeneration(user_id=user, prompt="spring sale banner",
                                               format=FORMAT, **kw))


def one_job(world: World) -> dict[str, Any]:
    jobs = world.jobs()
    assert len(jobs) == 1, jobs
    return jobs[0]


def result(world: World, gen_id: str, job_id: str, event_type: str, **kw: Any) -> str:
    if event_type == SAMPLES_READY:
        kw.setdefault("samples", sample_list())
    elif event_type == FINAL_READY:
        kw.setdefault("asset", dict(ASSET))
    elif event_type == FAILED:
        kw.setdefault("error", dict(FATAL))
    return world.bus.handle(ApplyResult(event_type, gen_id, job_id, **kw))


def to_awaiting(world: World, user: str = "u-1") -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a generation and deliver its samples; returns (generation, samples job)."""
    gen = start(world, user)
    job = one_job(world)
    assert result(world, gen["id"], job["job_id"], SAMPLES_READY) == "applied"
    return world.queries.get(gen["id"]), job


def to_final(world: World, resolution: str = "standard",
             user: str = "u-1") -> tuple[dict[str, Any], dict[str, Any]]:
    gen, _ = to_awaiting(world, user)
    gen = world.bus.handle(SelectSample(gen["id"], "s2", resolution))
    return gen, one_job(world)


def events(world: World, gen_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    evs = world.queries.history(gen_id)["events"]
    return [e for e in evs if kind is None or e["kind"] == kind]


def rejections(world: World, gen_id: str) -> list[str]:
    return [e["detail"]["reason"] for e in events(world, gen_id, "rejected")]


def credit_ops(world: World, gen_id: str) -> list[tuple[str, str, str]]:
    return [(e["detail"]["op"], e["detail"]["stage"], e["detail"]["amount"])
            for e in events(world, gen_id, "credit")]


def account(world: World, user: str = "u-1") -> dict[str, Any]:
    return world.queries.account(user)


def notification_types(world: World) -> list[str]:
    return [b["type"] for b in world.published(NOTIFICATIONS)]


def hold_rows(world: World) -> list[Any]:
    with world.engine.connect() as conn:
        return list(conn.execute(select(holds)))


def snapshot(world: World, gen_id: str, user: str = "u-1") -> tuple[Any, ...]:
    """Everything a refused call must leave alone (history aside)."""
    world.pump()
    return (world.queries.get(gen_id), account(world, user), len(world.broker.published),
            [tuple(r) for r in hold_rows(world)])


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
    rounds don't (contract §2)."""
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


# ------------------------------------------------------------------ results (§4)
def test_duplicate_result_is_refused_and_changes_nothing(world: World) -> None:
    fund(world)
    gen = start(world)
    job = one_job(world)
    assert result(world, gen["id"], job["job_id"], SAMPLES_READY) == "applied"
    before = snapshot(world, gen["id"])
    assert result(world, gen["id"], job["job_id"], SAMPLES_READY,
                  samples=sample_list(2)) == "duplicate"
    assert snapshot(world, gen["id"]) == before
    assert world.queries.get(gen["id"])["samples"] == sample_list()
    assert rejections(world, gen["id"]) == ["duplicate"]


def test_result_for_a_retried_job_is_stale(world: World) -> None:
    """After a retry the first job is stale: its late success is not applied."""
    fund(world)
    gen = start(world)
    first = one_job(world)
    assert result(world, gen["id"], first["job_id"], FAILED, error=RETRYABLE) == "applied"
    world.clock.advance(1)
    assert world.bus.handle(FireDeadlines()) == 1
    second = one_job(world)
    before = snapshot(world, gen["id"])
    assert result(world, gen["id"], first["job_id"], SAMPLES_READY) == "stale_job"
    assert snapshot(world, gen["id"]) == before
    assert rejections(world, gen["id"]) == ["stale_job"]
    assert result(world, gen["id"], second["job_id"], SAMPLES_READY) == "applied"


def test_result_while_waiting_for_a_retry_is_stale(world: World) -> None:
    fund(world)
    gen = start(world)
    job = one_job(world)
    result(world, gen["id"], job["job_id"], FAILED, error=RETRYABLE)
    assert result(world, gen["id"], job["job_id"], SAMPLES_READY) == "stale_job"
    assert world.queries.get(gen["id"])["state"] == "processing_samples"


def test_result_of_the_wrong_type_for_the_state_is_refused(world: World) -> None:
    fund(world)
    gen, job = to_awaiting(world)
    before = snapshot(world, gen["id"])
    assert result(world, gen["id"], job["job_id"], FAILED) == "wrong_state"
    assert result(world, gen["id"], job["job_id"], FINAL_READY) == "wrong_state"
    assert snapshot(world, gen["id"]) == before
    assert rejections(world, gen["id"]) == ["wrong_state", "wrong_state"]
    detail = events(world, gen["id"], "rejected")[0]["detail"]
    assert detail["job_id"] == job["job_id"] and detail["event_type"] == FAILED


def test_result_for_an_unknown_generation(world: World) -> None:
    fund(world)
    gen = start(world)
    job = one_job(world)
    before = snapshot(world, gen["id"])
    assert result(world, "00000000-0000-0000-0000-000000000000", job["job_id"],
                  SAMPLES_READY) == "unknown_generation"
    assert snapshot(world, gen["id"]) == before
    assert rejections(world, gen["id"]) == []
    # the dedup key was not burnt on the unknown generation: the real result still applies
    assert result(world, gen["id"], job["job_id"], SAMPLES_READY) == "applied"


def test_received_results_are_recorded_as_message_in(world: World) -> None:
    fund(world)
    gen = start(world)
    job = one_job(world)
    result(world, gen["id"], job["job_id"], SAMPLES_READY)
    result(world, gen["id"], job["job_id"], SAMPLES_READY)
    received = events(world, gen["id"], "message_in")
    assert [(e["actor"], e["detail"]["event_type"], e["detail"]["job_id"])
            for e in received] == [("n8n", SAMPLES_READY, job["job_id"])] * 2


def test_progress_is_notified_and_changes_nothing(world: World) -> None:
    """Progress: a ``progress`` notification, no state or credit change (contract §4)."""
    fund(world)
    gen = start(world)
    job = one_job(world)
    before = snapshot(world, gen["id"])
    assert result(world, gen["id"], job["job_id"], PROGRESS, percent=40) == "applied"
    assert result(world, gen["id"], job["job_id"], PROGRESS, percent=60) == "applied"
    world.pump()
    progress = [m for m in world.broker.published if m.exchange == NOTIFICATIONS]
    assert [m.routing_key for m in progress] == ["notification.generation.progress"] * 2
    assert [m.body["type"] for m in progress] == ["progress", "progress"]
    assert [m.body["data"]["percent"] for m in progress] == [40, 60]
    assert world.queries.get(gen["id"]) == before[0]
    assert account(world) == before[1]
    assert [e["detail"].get("percent") for e in events(world, gen["id"], "message_in")] == [
        40, 60]


def test_progress_for_a_stale_job_is_recorded_as_rejected(world: World) -> None:
    fund(world)
    gen = start(world)
    one_job(world)
    assert result(world, gen["id"], "not-the-job", PROGRESS, percent=10) == "stale_job"
    assert rejections(world, gen["id"]) == ["stale_job"]
    assert world.published(NOTIFICATIONS) == []


# ------------------------------------------------------------------ retries (§1)
def test_retryable_failure_is_redispatched_after_the_backoff(world: World) -> None:
    fund(world)
    gen = start(world)
    first = one_job(world)
    assert result(world, gen["id"], first["job_id"], FAILED, error=RETRYABLE) == "applied"
    assert world.queries.get(gen["id"])["credits"]["held"] == "0.25"  # the hold stays
    assert world.jobs() == []
    world.clock.advance(0.5)
    assert world.bus.handle(FireDeadlines()) == 0  # backoff not over yet
    world.clock.advance(0.5)
    assert world.bus.handle(FireDeadlines()) == 1
    second = one_job(world)
    assert second["job_id"] != first["job_id"] and second["attempt"] == 2
    assert second["stage"] == "samples"
    assert second["deadline_at"] == _iso(world.clock.now + timedelta(seconds=120))
    view = world.queries.get(gen["id"])
    assert view["attempt"] == 2 and view["state"] == "processing_samples"
    assert account(world)["held"] == "0.25"


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def fail_every_attempt(world: World, gen_id: str) -> list[dict[str, Any]]:
    jobs = [one_job(world)]
    for attempt in range(1, world.config.max_attempts + 1):
        assert result(world, gen_id, jobs[-1]["job_id"], FAILED, error=RETRYABLE) == "applied"
        if attempt < world.config.max_attempts:
            world.clock.advance(world.config.retry_delay(attempt).total_seconds())
            assert world.bus.handle(FireDeadlines()) == 1
            jobs.append(one_job(world))
    return jobs


def test_samples_fail_after_max_attempts_and_release_the_hold(world: World) -> None:
    fund(world)
    gen = start(world)
    jobs = fail_every_attempt(world, gen["id"])
    assert [j["attempt"] for j in jobs] == [1, 2, 3]
    assert len({j["job_id"] for j in jobs}) == 3
    view = world.queries.get(gen["id"])
    assert view["state"] == "failed"
    assert view["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    assert account(world)["available"] == "10.00" and account(world)["balance"] == "10.00"
    assert notification_types(world) == ["failed"]
    assert credit_ops(world, gen["id"]) == [("reserve", "samples", "0.25"),
                                            ("release", "samples", "0.25")]


def test_final_fails_after_max_attempts_back_to_selection(world: World) -> None:
    fund(world)
    gen, _ = to_awaiting(world)
    world.bus.handle(SelectSample(gen["id"], "s1", "standard"))
    fail_every_attempt(world, gen["id"])
    view = world.queries.get(gen["id"])
    assert view["state"] == "awaiting_selection"
    assert view["error"]["code"] == "final_failed"
    assert view["credits"] == {"held": "0.00", "charged": "0.25", "released": "1.00"}
    assert view["deadline_at"] == _iso(world.clock.now + timedelta(hours=24))
    assert account(world)["balance"] == "9.75"


# ------------------------------------------------------------------ deadlines (§5)
def test_samples_deadline_times_out_and_releases(world: World) -> None:
    fund(world)
    gen = start(world)
    job = one_job(world)
    assert gen["deadline_at"] == _iso(world.clock.now + timedelta(seconds=120))
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
    assert view["deadline_at"] == _iso(world.clock.now + timedelta(hours=24))
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


# ------------------------------------------------------------------ history (§3)
def full_run(world: World) -> str:
    fund(world)
    gen, _ = to_awaiting(world)
    world.bus.handle(SelectSample(gen["id"], "s2", "high"))
    job = one_job(world)
    assert result(world, gen["id"], job["job_id"], FINAL_READY) == "applied"
    return str(gen["id"])


def test_history_of_a_full_run_is_complete_and_ordered(world: World) -> None:
    gen_id = full_run(world)
    evs = events(world, gen_id)
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs == list(range(1, len(seqs) + 1))

    def describe(e: dict[str, Any]) -> tuple[Any, ...]:
        d = e["detail"]
        if e["kind"] == "transition":
            return ("transition", e["trigger"], e["from_state"], e["to_state"], e["actor"])
        if e["kind"] == "credit":
            return ("credit", d["op"], d["stage"], d["amount"])
        if e["kind"] == "message_out":
            return ("out", d["routing_key"])
        return (e["kind"], d.get("event_type"))

    assert [describe(e) for e in evs] == [
        ("transition", "start", "requested", "processing_samples", "odoo"),
        ("credit", "reserve", "samples", "0.25"),
        ("out", "generation.job.samples"),
        ("out", "generation.processing_samples"),
        ("message_in", SAMPLES_READY),
        ("transition", "samples_ready", "processing_samples", "awaiting_selection", "n8n"),
        ("credit", "commit", "samples", "0.25"),
        ("out", "notification.generation.samples_ready"),
        ("out", "generation.awaiting_selection"),
        ("transition", "select", "awaiting_selection", "processing_final", "odoo"),
        ("credit", "reserve", "final", "2.00"),
        ("out", "generation.job.final"),
        ("out", "generation.processing_final"),
        ("message_in", FINAL_READY),
        ("transition", "final_ready", "processing_final", "completed", "n8n"),
        ("credit", "commit", "final", "2.00"),
        ("out", "notification.generation.final_ready"),
        ("out", "generation.completed"),
    ]
    # the reserve and the commit of one stage name the same hold
    credit = events(world, gen_id, "credit")
    assert credit[0]["detail"]["hold_id"] == credit[1]["detail"]["hold_id"]
    assert credit[2]["detail"]["hold_id"] == credit[3]["detail"]["hold_id"]
    assert credit[0]["detail"]["hold_id"] != credit[2]["detail"]["hold_id"]
    assert all(e["actor"] in ("odoo", "n8n", "timer", "support", "system") for e in evs)


def test_history_out_messages_match_what_was_published(world: World) -> None:
    gen_id = full_run(world)
    world.pump()
    sent = [(m.exchange, m.routing_key, m.message_id) for m in world.broker.published]
    logged = [(e["detail"]["exchange"], e["detail"]["routing_key"], e["detail"]["event_id"])
              for e in events(world, gen_id, "message_out")]
    assert logged == sent


def test_domain_events_and_notifications_follow_each_state_change(world: World) -> None:
    gen_id = full_run(world)
    world.pump()
    evs = [m for m in world.broker.published if m.exchange == EVENTS]
    assert [m.routing_key for m in evs] == [
        "generation.processing_samples", "generation.awaiting_selection",
        "generation.processing_final", "generation.completed"]
    assert [(m.body["from_state"], m.body["to_state"]) for m in evs] == [
        ("requested", "processing_samples"), ("processing_samples", "awaiting_selection"),
        ("awaiting_selection", "processing_final"), ("processing_final", "completed")]
    assert [m.body["credits"] for m in evs] == [
        {"held": "0.25", "charged": "0.00", "released": "0.00"},
        {"held": "0.00", "charged": "0.25", "released": "0.00"},
        {"held": "2.00", "charged": "0.25", "released": "0.00"},
        {"held": "0.00", "charged": "2.25", "released": "0.00"}]
    for m in evs:
        assert set(m.body) == {"event_type", "event_id", "occurred_at", "generation_id",
                               "user_id", "from_state", "to_state", "credits"}
        assert m.body["event_type"] == m.type == "GenerationStateChanged"
        assert (m.body["generation_id"], m.body["user_id"]) == (gen_id, "u-1")
        assert m.message_id == m.body["event_id"] and m.correlation_id == gen_id

    notes = [m for m in world.broker.published if m.exchange == NOTIFICATIONS]
    assert [m.routing_key for m in notes] == ["notification.generation.samples_ready",
                                              "notification.generation.final_ready"]
    for m, state in zip(notes, ["awaiting_selection", "completed"], strict=True):
        assert set(m.body) == {"event_type", "event_id", "occurred_at", "type", "user_id",
                               "generation_id", "state", "message", "data"}
        assert m.body["event_type"] == m.type == "GenerationNotification"
        assert m.body["state"] == state and m.body["user_id"] == "u-1"
        assert m.message_id == m.body["event_id"] and m.correlation_id == gen_id
    assert notes[0].body["data"]["samples"] == sample_list()
    assert notes[1].body["data"]["asset"] == ASSET


def test_every_state_change_is_published_once(world: World) -> None:
    """Across retries, a final timeout, a reselection and a cancel, the domain events are
    exactly the history's state-changing transitions, in order, with matching credits."""
    fund(world)
    gen, _ = to_awaiting(world)
    gen_id = gen["id"]
    world.bus.handle(SelectSample(gen_id, "s1", "high"))
    job = one_job(world)
    result(world, gen_id, job["job_id"], FAILED, error=RETRYABLE)  # internal: no event
    world.clock.advance(1)
    world.bus.handle(FireDeadlines())  # redispatch: no event
    one_job(world)
    world.clock.advance(600)
    world.bus.handle(FireDeadlines())  # final timed out -> awaiting_selection
    world.bus.handle(Regenerate(gen_id))
    world.bus.handle(Cancel(gen_id))
    changes = [(e["from_state"], e["to_state"]) for e in events(world, gen_id, "transition")
               if e["from_state"] != e["to_state"]]
    world.pump()
    published = [m for m in world.broker.published if m.exchange == EVENTS]
    assert [(m.body["from_state"], m.body["to_state"]) for m in published] == changes
    assert changes == [("requested", "processing_samples"),
                       ("processing_samples", "awaiting_selection"),
                       ("awaiting_selection", "processing_final"),
                       ("processing_final", "awaiting_selection"),
                       ("awaiting_selection", "processing_samples"),
                       ("processing_samples", "cancelled")]
    assert [m.routing_key for m in published] == [f"generation.{t}" for _, t in changes]
    assert published[-1].body["credits"] == {"held": "0.00", "charged": "0.25",
                                             "released": "2.25"}
    assert notification_types(world) == ["samples_ready", "final_timed_out", "cancelled"]


def test_final_failure_notifies_and_publishes_the_return_to_selection(world: World) -> None:
    fund(world)
    gen, job = to_final(world)
    assert result(world, gen["id"], job["job_id"], FAILED, error=FATAL) == "applied"
    world.pump()
    last_event = [m for m in world.broker.published if m.exchange == EVENTS][-1]
    assert last_event.routing_key == "generation.awaiting_selection"
    assert (last_event.body["from_state"], last_event.body["to_state"]) == (
        "processing_final", "awaiting_selection")
    assert notification_types(world)[-1] == "final_failed"


# ------------------------------------------------------------------ message shapes (§4)
JOB_FIELDS = {"event_type", "event_id", "occurred_at", "generation_id", "job_id", "stage",
              "attempt", "user_id", "prompt", "negative_prompt", "style", "brand",
              "input_assets", "format", "sample_count", "sample_size", "selected_sample",
              "output", "storage", "reply", "deadline_at"}


def test_samples_job_carries_the_contract_fields(world: World) -> None:
    fund(world, user="u-42")
    gen = world.bus.handle(StartGeneration(
        user_id="u-42", prompt="spring sale banner, pastel", format=FORMAT,
        negative_prompt="text", style={"tone": "playful", "industry": "retail", "preset": None},
        brand={"colors": ["#FF6B35"], "logo_url": None},
        input_assets=["https://example.com/a.png"], sample_count=3, project_id="p-7",
        metadata={"k": "v"}))
    world.pump()
    (msg,) = [m for m in world.broker.published if m.routing_key.startswith("generation.job")]
    job = msg.body
    assert set(job) == JOB_FIELDS
    assert job["event_type"] == "AIGenerationJobRequested"
    assert job["occurred_at"] == _iso(world.clock.now)
    assert job["generation_id"] == gen["id"]
    assert job["stage"] == "samples" and job["attempt"] == 1
    assert job["user_id"] == "u-42" and job["prompt"] == "spring sale banner, pastel"
    assert job["negative_prompt"] == "text"
    assert job["style"] == {"tone": "playful", "industry": "retail", "preset": None}
    assert job["brand"] == {"colors": ["#FF6B35"], "logo_url": None}
    assert job["input_assets"] == ["https://example.com/a.png"]
    assert job["format"] == FORMAT
    assert job["sample_count"] == 3 and job["sample_size"] == 512
    assert job["selected_sample"] is None and job["output"] is None
    assert job["storage"] == {"bucket": "creativeflow-assets",
                              "prefix": f"users/u-42/generations/{gen['id']}/samples/"}
    assert job["reply"] == {"exchange": "creativeflow.generation",
                            "routing_key_prefix": "generation.result."}
    assert job["deadline_at"] == _iso(world.clock.now + timedelta(seconds=120))
    assert job["deadline_at"] == gen["deadline_at"]
    assert (msg.exchange, msg.routing_key) == ("creativeflow.generation",
                                               "generation.job.samples")
    assert msg.message_id == job["event_id"] and msg.correlation_id == gen["id"]
    assert msg.type == "AIGenerationJobRequested"


def test_final_job_carries_selection_and_scaled_output(world: World) -> None:
    fund(world)
    gen, _ = to_awaiting(world)
    world.clock.advance(30)
    world.bus.handle(SelectSample(gen["id"], "s3", "standard"))
    job = one_job(world)
    assert set(job) == JOB_FIELDS
    assert job["stage"] == "final" and job["attempt"] == 1
    assert job["selected_sample"] == {"sample_id": "s3",
                                      "url": "s3://creativeflow-assets/k/s3.png"}
    assert job["output"] == {"width": 1152, "height": 2048, "format": "png"}
    assert job["storage"]["prefix"] == f"users/u-1/generations/{gen['id']}/final/"
    assert job["deadline_at"] == _iso(world.clock.now + timedelta(seconds=600))


def test_journal_records_every_credit_step(world: World) -> None:
    full_run(world)
    with world.engine.connect() as conn:
        rows = list(conn.execute(select(journal).order_by(journal.c.id)))
    assert [(r.kind, r.balance_delta_cents, r.held_delta_cents) for r in rows] == [
        ("grant", 1000, 0), ("reserve", 0, 25), ("commit", -25, -25),
        ("reserve", 0, 200), ("commit", -200, -200)]
