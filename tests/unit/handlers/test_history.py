"""The history every handler writes (what support reads), on the SQLite tier."""

from __future__ import annotations

from typing import Any

from saga.commands import (
    Cancel,
    FireDeadlines,
    Regenerate,
    SelectSample,
)
from tests.conftest import World
from tests.unit.handlers.helpers import (
    ASSET,
    EVENTS,
    FAILED,
    FATAL,
    FINAL_READY,
    NOTIFICATIONS,
    RETRYABLE,
    SAMPLES_READY,
    events,
    full_run,
    fund,
    notification_types,
    one_job,
    result,
    sample_list,
    to_awaiting,
    to_final,
)


# ------------------------------------------------------------------ history (§3)
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
