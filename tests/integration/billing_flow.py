"""A generation driven to ``processing_final`` against the external billing stand-in: shared
by the external-billing tests (refusals, a commit lost to a crash)."""

from __future__ import annotations

from saga.commands import ApplyResult, SelectSample, StartGeneration
from standins.billing import BillingStandIn
from tests.conftest import World

FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}
SAMPLES = [{"sample_id": f"s{i}", "url": f"s3://b/s{i}.png", "width": 512, "height": 512}
           for i in range(1, 5)]


def to_final(world: World, billing: BillingStandIn) -> tuple[str, str]:
    """Open u-1 at billing, start, apply samples, select: (generation id, final job id)."""
    billing.open_account("u-1", "free", "10.00")
    gen = world.bus.handle(StartGeneration(user_id="u-1", prompt="p", format=FORMAT))
    (job,) = world.jobs()
    assert world.bus.handle(ApplyResult("AIGenerationSamplesReady", gen["id"], job["job_id"],
                                        samples=SAMPLES)) == "applied"
    world.bus.handle(SelectSample(gen["id"], "s1", "standard"))
    (final_job,) = world.jobs()
    return gen["id"], final_job["job_id"]
