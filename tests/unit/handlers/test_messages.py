"""The shapes of the messages the handlers put in the outbox, on the SQLite tier."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from persistence.tables import journal
from saga.commands import (
    SelectSample,
    StartGeneration,
)
from tests.conftest import World
from tests.unit.handlers.helpers import (
    FORMAT,
    full_run,
    fund,
    iso_z,
    one_job,
    to_awaiting,
)

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
    assert job["occurred_at"] == iso_z(world.clock.now)
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
    assert job["deadline_at"] == iso_z(world.clock.now + timedelta(seconds=120))
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
    assert job["deadline_at"] == iso_z(world.clock.now + timedelta(seconds=600))


def test_journal_records_every_credit_step(world: World) -> None:
    full_run(world)
    with world.engine.connect() as conn:
        rows = list(conn.execute(select(journal).order_by(journal.c.id)))
    assert [(r.kind, r.balance_delta_cents, r.held_delta_cents) for r in rows] == [
        ("grant", 1000, 0), ("reserve", 0, 25), ("commit", -25, -25),
        ("reserve", 0, 200), ("commit", -200, -200)]
