"""The happy path through the real handlers on SQLite, with the ledger checked at each step."""

from __future__ import annotations

from decimal import Decimal

from saga.commands import ApplyResult, Cancel, FireDeadlines, Grant, SelectSample, StartGeneration
from tests.conftest import World

FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}


def samples(n: int = 4) -> list[dict[str, object]]:
    return [{"sample_id": f"s{i}", "url": f"s3://b/k/s{i}.png", "width": 512, "height": 512}
            for i in range(1, n + 1)]


def test_happy_path_charges_the_price_book(world: World) -> None:
    svc = world
    svc.bus.handle(Grant("u-1", Decimal("10.00"), "welcome"))
    gen = svc.bus.handle(StartGeneration(user_id="u-1", prompt="spring sale", format=FORMAT))
    assert gen["state"] == "processing_samples"
    assert gen["credits"] == {"held": "0.25", "charged": "0.00", "released": "0.00"}
    assert svc.queries.account("u-1")["available"] == "9.75"

    (job,) = world.jobs()
    assert job["stage"] == "samples" and job["attempt"] == 1 and job["sample_size"] == 512
    assert job["storage"]["prefix"] == f"users/u-1/generations/{gen['id']}/samples/"

    assert svc.bus.handle(ApplyResult("AIGenerationSamplesReady", gen["id"], job["job_id"],
                                        samples=samples())) == "applied"
    gen = svc.bus.handle(SelectSample(gen["id"], "s2", "high"))
    assert gen["state"] == "processing_final"
    (final_job,) = world.jobs()
    assert final_job["output"] == {"width": 4096, "height": 4096, "format": "png"}
    assert final_job["selected_sample"]["sample_id"] == "s2"

    asset = {"url": "s3://b/final.png", "width": 4096, "height": 4096, "format": "png"}
    assert svc.bus.handle(ApplyResult("AIGenerationFinalAssetReady", gen["id"],
                                        final_job["job_id"], asset=asset)) == "applied"
    gen = svc.queries.get(gen["id"])
    assert gen["state"] == "completed" and gen["deadline_at"] is None
    assert gen["credits"] == {"held": "0.00", "charged": "2.25", "released": "0.00"}
    assert svc.queries.account("u-1") == {"user_id": "u-1", "plan": "free", "balance": "7.75",
                                  "held": "0.00", "available": "7.75"}
    kinds = [e["kind"] for e in svc.queries.history(gen["id"])["events"]]
    assert kinds.count("transition") == 4 and kinds.count("credit") == 4


def test_a_timer_the_saga_no_longer_accepts_is_dropped_not_spun_on(world: World) -> None:
    """A stale due_at (here: a selection timer forced onto a completed saga) fires once,
    is recorded as ignored, and is never claimed again."""
    from sqlalchemy import update

    from persistence.tables import generations

    svc = world
    svc.bus.handle(Grant("u-1", Decimal("10.00"), "welcome"))
    gen = svc.bus.handle(StartGeneration(user_id="u-1", prompt="p", format=FORMAT))
    svc.bus.handle(Cancel(gen["id"]))
    with world.engine.begin() as conn:
        row = conn.execute(generations.select()).one()
        body = {**row.body, "due_kind": "selection"}
        conn.execute(update(generations).values(due_at=world.clock.now, body=body))
    world.clock.advance(1)
    assert svc.bus.handle(FireDeadlines()) == 1
    assert svc.bus.handle(FireDeadlines()) == 0
    notes = [e for e in svc.queries.history(gen["id"])["events"] if e["kind"] == "note"]
    assert notes[-1]["detail"] == {"ignored_timer": "selection", "state": "cancelled"}
    assert svc.queries.get(gen["id"])["state"] == "cancelled"
