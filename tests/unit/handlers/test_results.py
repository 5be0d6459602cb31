"""Results from n8n on the SQLite tier: applied, refused, retried."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from saga.commands import (
    FireDeadlines,
    SelectSample,
)
from tests.conftest import World
from tests.unit.handlers.helpers import (
    FAILED,
    FINAL_READY,
    NOTIFICATIONS,
    PROGRESS,
    RETRYABLE,
    SAMPLES_READY,
    account,
    credit_ops,
    events,
    fund,
    iso_z,
    notification_types,
    one_job,
    rejections,
    result,
    sample_list,
    snapshot,
    start,
    to_awaiting,
)


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
    """Progress: a ``progress`` notification, no state or credit change (docs/messages.md)."""
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
    assert second["deadline_at"] == iso_z(world.clock.now + timedelta(seconds=120))
    view = world.queries.get(gen["id"])
    assert view["attempt"] == 2 and view["state"] == "processing_samples"
    assert account(world)["held"] == "0.25"


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
    assert view["deadline_at"] == iso_z(world.clock.now + timedelta(hours=24))
    assert account(world)["balance"] == "9.75"
