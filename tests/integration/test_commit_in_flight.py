"""A commit sent to external billing whose transaction was lost (stand-in on loopback, PG).

Applying a successful result commits the hold remotely before our transaction commits. A
process killed in between leaves the hold open here although billing committed it, and the
saga still processing. The result is redelivered, but the saga's deadline may come first: it
must not release that hold (billing would answer 409 — or worse, undo a charge for delivered
work). It yields to the result, re-arming itself; past the retry budget it parks the saga.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from persistence.tables import billing_commits_sent, holds
from saga.commands import ApplyResult, Cancel, FireDeadlines, StartGeneration
from saga.errors import InvalidState
from standins.billing import BillingStandIn
from tests.conftest import FakeClock, World
from tests.integration.billing_flow import FORMAT, SAMPLES, to_final

pytestmark = pytest.mark.integration
ASSET = {"url": "s3://b/f.png", "width": 2048, "height": 2048}
FINAL_DEADLINE_S = 600  # tests.conftest.TEST_CONFIG


def crash_after_the_remote_commit(world: World, billing: BillingStandIn) -> tuple[str, str, str]:
    """A saga in processing_final whose final hold billing committed while our transaction
    (that would have completed the saga) was lost: (generation id, final job id, hold id)."""
    gid, final_job_id = to_final(world, billing)
    with world.engine.connect() as conn:
        hold_id = conn.execute(select(holds.c.hold_id).where(
            holds.c.generation_id == gid, holds.c.status == "open")).scalar_one()
    uow = world.bus.ctx.uow_factory()
    with uow:  # what applying the result does first; then the process dies: no commit
        uow.billing.prepare_settle(hold_id, commit=True)
    assert billing.holds[hold_id]["status"] == "committed"
    assert world.queries.get(gid)["state"] == "processing_final"
    return gid, final_job_id, hold_id


def transitions_of(billing: BillingStandIn, hold_id: str) -> list[str]:
    return [status for hid, status in billing.transitions if hid == hold_id]


def markers(world: World) -> int:
    with world.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(billing_commits_sent))
                   .scalar_one())


def test_the_deadline_yields_to_the_redelivered_result(
        ext_world: World, billing: BillingStandIn, clock: FakeClock) -> None:
    gid, job_id, hold_id = crash_after_the_remote_commit(ext_world, billing)
    clock.advance(FINAL_DEADLINE_S + 1)
    assert ext_world.bus.handle(FireDeadlines()) == 1
    saga = ext_world.queries.get(gid)
    assert saga["state"] == "processing_final" and saga["attention"] is None
    assert billing.violations == [] and transitions_of(billing, hold_id) == ["open",
                                                                             "committed"]
    notes = [e["detail"] for e in ext_world.queries.history(gid)["events"]
             if e["kind"] == "note" and "deadline_deferred" in e["detail"]]
    assert notes == [{"deadline_deferred": "timer", "reason": "commit_sent_to_billing",
                      "hold_id": hold_id, "attempt": 1}]
    assert ext_world.bus.handle(FireDeadlines()) == 0  # re-armed a little later

    # The redelivered result: billing answers the repeated commit as a replay.
    assert ext_world.bus.handle(ApplyResult("AIGenerationFinalAssetReady", gid, job_id,
                                            asset=ASSET)) == "applied"
    saga = ext_world.queries.get(gid)
    assert saga["state"] == "completed" and saga["credits"]["held"] == "0.00"
    assert transitions_of(billing, hold_id) == ["open", "committed"]
    assert billing.violations == [] and markers(ext_world) == 0
    clock.advance(3600)
    assert ext_world.bus.handle(FireDeadlines()) == 0  # nothing left to fire


def test_a_result_that_never_comes_back_parks_the_saga_without_a_release(
        ext_world: World, billing: BillingStandIn, clock: FakeClock) -> None:
    gid, _, hold_id = crash_after_the_remote_commit(ext_world, billing)
    clock.advance(FINAL_DEADLINE_S + 1)
    fired = 0
    while ext_world.queries.get(gid)["attention"] is None:
        assert fired < 20, "never parked"
        assert ext_world.bus.handle(FireDeadlines()) == 1
        fired += 1
        clock.advance(60)  # past any backoff of the retry policy
    saga = ext_world.queries.get(gid)
    # It waited config.commit_wait (120 s) on the policy's backoff (0.5 s doubling, 30 s cap).
    assert fired == 10
    assert saga["state"] == "processing_final" and saga["credits"]["held"] == "1.00"
    assert saga["attention"]["kind"] == "timer"
    assert f"a commit of hold {hold_id} was sent to billing" in saga["attention"]["reason"]
    assert billing.violations == [] and transitions_of(billing, hold_id) == ["open",
                                                                             "committed"]
    assert ext_world.bus.handle(FireDeadlines()) == 0  # parked: the sweeper skips it


def test_a_cancel_does_not_release_a_hold_whose_commit_was_sent(
        ext_world: World, billing: BillingStandIn) -> None:
    gid, job_id, hold_id = crash_after_the_remote_commit(ext_world, billing)
    with pytest.raises(InvalidState):
        ext_world.bus.handle(Cancel(gid))
    assert ext_world.queries.get(gid)["state"] == "processing_final"
    assert billing.violations == [] and transitions_of(billing, hold_id) == ["open",
                                                                             "committed"]
    assert ext_world.bus.handle(ApplyResult("AIGenerationFinalAssetReady", gid, job_id,
                                            asset=ASSET)) == "applied"
    assert ext_world.queries.get(gid)["state"] == "completed"
    assert billing.violations == []


def test_a_refused_commit_leaves_no_marker(ext_world: World, billing: BillingStandIn) -> None:
    """Billing refusing the commit (a 4xx) did not commit: the hold may be released later."""
    billing.open_account("u-1", "free", "10.00")
    gen = ext_world.bus.handle(StartGeneration(user_id="u-1", prompt="p", format=FORMAT))
    (job,) = ext_world.jobs()
    billing.refuse_commits_for.add("u-1")
    with pytest.raises(Exception, match="HTTP 422"):
        ext_world.bus.handle(ApplyResult("AIGenerationSamplesReady", gen["id"],
                                         job["job_id"], samples=SAMPLES))
    assert markers(ext_world) == 0
    ext_world.bus.handle(Cancel(gen["id"]))
    assert ext_world.queries.get(gen["id"])["state"] == "cancelled"
    assert billing.violations == [] and billing.status_counts() == {"released": 1}
