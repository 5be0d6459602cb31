"""The external billing adapter against a real HTTP stand-in on loopback (docs/api.md, credits).

The stand-in is sometimes slow, sometimes down, sometimes answers 500 — before or after doing
the work. Holds must still end committed or released exactly once, and a release the backend
cannot take makes the saga wait in ``compensating`` until it can.
"""

from __future__ import annotations

import contextlib
import functools
import random
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, select

from persistence.external_billing import (
    PENDING_GRACE,
    ExternalBilling,
    HttpBillingClient,
    reap_pending_holds,
)
from persistence.tables import holds
from saga.commands import ApplyResult, Cancel, FireDeadlines, SelectSample, StartGeneration
from saga.errors import BillingUnavailable, DomainError, InsufficientCredits
from standins.billing import BillingStandIn
from tests.conftest import World

pytestmark = pytest.mark.integration
FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}


def samples() -> list[dict[str, Any]]:
    return [{"sample_id": f"s{i}", "url": f"s3://b/s{i}.png", "width": 512, "height": 512}
            for i in range(1, 5)]


def start(world: World, user: str = "u-1") -> dict[str, Any]:
    return world.bus.handle(StartGeneration(user_id=user, prompt="p", format=FORMAT))


def result(world: World, gid: str, kind: str, **kw: Any) -> str:
    (job,) = world.jobs()
    event = {"samples": "AIGenerationSamplesReady", "final": "AIGenerationFinalAssetReady",
             "failed": "AIGenerationFailed"}[kind]
    return world.bus.handle(ApplyResult(event, gid, job["job_id"], **kw))


def test_holds_commit_through_the_backend(ext_world: World, billing: BillingStandIn) -> None:
    billing.open_account("u-1", "free", "10.00")
    gen = start(ext_world)
    assert billing.status_counts() == {"open": 1}
    assert ext_world.queries.account("u-1") == {"user_id": "u-1", "plan": "free",
                                                "balance": "10.00", "held": "0.25",
                                                "available": "9.75"}
    assert result(ext_world, gen["id"], "samples", samples=samples()) == "applied"
    ext_world.bus.handle(SelectSample(gen["id"], "s1", "standard"))
    assert result(ext_world, gen["id"], "final", asset={"url": "s3://b/final.png", "width": 2048,
                                                        "height": 2048}) == "applied"
    assert billing.status_counts() == {"committed": 2}
    assert billing.accounts["u-1"]["available"] == 10 - 1.25
    assert billing.violations == []


def test_refused_by_the_backend_is_402_and_nothing_is_dispatched(
        ext_world: World, billing: BillingStandIn) -> None:
    billing.open_account("u-1", "free", "0.10")
    with pytest.raises(InsufficientCredits):
        start(ext_world)
    assert ext_world.jobs() == [] and billing.holds == {}


def test_backend_down_at_start_refuses_and_leaves_nothing(
        ext_world: World, billing: BillingStandIn) -> None:
    billing.open_account("u-1", "free", "10.00")
    billing.down = True
    with pytest.raises(BillingUnavailable):
        start(ext_world)
    billing.down = False
    assert ext_world.jobs() == []
    assert all(h["status"] != "open" for h in billing.holds.values())


def test_release_waits_in_compensating_until_the_backend_answers(
        ext_world: World, billing: BillingStandIn) -> None:
    svc, clock = ext_world, ext_world.clock
    billing.open_account("u-1", "free", "10.00")
    gen = start(ext_world)
    billing.down = True
    outcome = result(ext_world, gen["id"], "failed",
                     error={"code": "bad_prompt", "message": "no", "retryable": False})
    assert outcome == "applied"
    stuck = svc.queries.get(gen["id"])
    assert stuck["state"] == "compensating" and stuck["credits"]["held"] == "0.25"
    # No failure notification yet: the user hears about it once the hold is released.
    assert [n["type"] for n in ext_world.published("creativeflow.notifications")] == []

    clock.advance(2)
    assert svc.bus.handle(FireDeadlines()) == 1  # retried, still down
    assert svc.queries.get(gen["id"])["state"] == "compensating"
    billing.down = False
    clock.advance(5)
    assert svc.bus.handle(FireDeadlines()) == 1
    done = svc.queries.get(gen["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "bad_prompt"
    assert done["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    assert billing.status_counts() == {"released": 1} and billing.violations == []
    assert [n["type"] for n in ext_world.published("creativeflow.notifications")] == ["failed"]
    events = svc.queries.history(gen["id"])["events"]
    path = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
    assert path == [("requested", "processing_samples"),
                    ("processing_samples", "compensating"), ("compensating", "failed")]
    assert any(e["kind"] == "note" and e["detail"].get("tries") == 2 for e in events)
    with ext_world.engine.connect() as conn:
        assert conn.execute(select(holds.c.status)).scalars().all() == ["released"]


def test_cancel_while_compensating_a_final_failure_lands_in_cancelled(
        ext_world: World, billing: BillingStandIn) -> None:
    svc, clock = ext_world, ext_world.clock
    billing.open_account("u-1", "free", "10.00")
    gen = start(ext_world)
    result(ext_world, gen["id"], "samples", samples=samples())
    svc.bus.handle(SelectSample(gen["id"], "s2", "high"))
    billing.down = True
    clock.advance(601)  # the final's deadline passes while billing is down
    svc.bus.handle(FireDeadlines())
    assert svc.queries.get(gen["id"])["state"] == "compensating"
    assert svc.bus.handle(Cancel(gen["id"]))["state"] == "compensating"
    billing.down = False
    clock.advance(5)
    svc.bus.handle(FireDeadlines())
    done = svc.queries.get(gen["id"])
    assert done["state"] == "cancelled"
    assert done["credits"] == {"held": "0.00", "charged": "0.25", "released": "2.00"}
    assert billing.status_counts() == {"committed": 1, "released": 1}


def test_cancel_of_a_compensating_samples_failure_is_refused(
        ext_world: World, billing: BillingStandIn) -> None:
    billing.open_account("u-1", "free", "10.00")
    gen = start(ext_world)
    billing.down = True
    ext_world.bus.handle(Cancel(gen["id"]))
    assert ext_world.queries.get(gen["id"])["state"] == "compensating"
    with pytest.raises(DomainError) as refused:
        ext_world.bus.handle(Cancel(gen["id"]))
    assert refused.value.code == "invalid_state"


def redeliver(svc: Any, cmd: ApplyResult) -> str:
    """What the consumer does: a result that hit an unavailable backend goes back to the
    broker and comes again until it is applied or refused."""
    for _ in range(50):
        try:
            return str(svc.bus.handle(cmd))
        except BillingUnavailable:
            continue
    raise AssertionError("the backend never answered")


def test_flaky_slow_backend_still_settles_every_hold_exactly_once(
        ext_world: World, billing: BillingStandIn) -> None:
    """Random 500s (before and after the work) and slow answers over many generations."""
    svc, clock = ext_world, ext_world.clock
    rng = random.Random(3)
    for u in range(5):
        billing.open_account(f"u-{u}", "free", "1000.00")
    billing.error_rate, billing.slow_rate, billing.slow_seconds = 0.15, 0.05, 0.6
    live: list[str] = []
    for _ in range(60):
        with contextlib.suppress(BillingUnavailable):
            live.append(start(ext_world, f"u-{rng.randrange(5)}")["id"])
        for job in ext_world.jobs():
            kind = rng.choice(["ok", "ok", "fail", "lost"])
            gid = job["generation_id"]
            if kind == "lost":
                continue
            if kind == "fail":
                cmd = ApplyResult("AIGenerationFailed", gid, job["job_id"],
                                  error={"code": "x", "retryable": False})
            elif job["stage"] == "samples":
                cmd = ApplyResult("AIGenerationSamplesReady", gid, job["job_id"],
                                  samples=samples())
            else:
                cmd = ApplyResult("AIGenerationFinalAssetReady", gid, job["job_id"],
                                  asset={"url": "s3://b/final.png", "width": 1, "height": 1})
            redeliver(svc, cmd)
        for gid in live:
            if svc.queries.get(gid)["state"] == "awaiting_selection" and rng.random() < 0.7:
                with contextlib.suppress(BillingUnavailable, DomainError):
                    svc.bus.handle(SelectSample(gid, "s1", rng.choice(["standard", "high"])))
        clock.advance(rng.choice([1, 5, 130, 700]))
        svc.bus.handle(FireDeadlines())
    billing.error_rate = billing.slow_rate = 0.0
    clock.advance(timedelta(days=2).total_seconds())
    while svc.bus.handle(FireDeadlines()):
        clock.advance(120)
    ext_world.jobs()
    clock.advance(timedelta(days=2).total_seconds())
    while svc.bus.handle(FireDeadlines()):
        clock.advance(120)

    # Reservations whose rollback could not reach the backend were left pending: the
    # sweeper's reaper (run here by hand, with the faults off) releases them.
    reap_pending_holds(ext_world.engine, HttpBillingClient(billing.url),
                       clock.now + PENDING_GRACE * 2)
    assert billing.violations == []
    assert "open" not in billing.status_counts()
    with ext_world.engine.connect() as conn:
        mirror = dict(conn.execute(select(holds.c.hold_id, holds.c.status)).all())
    remote = {h: v["status"] for h, v in billing.holds.items()}
    # Every hold we recorded ended the same way at the backend; one the backend never
    # granted (refused, or its request lost) is recorded as released, and none is pending.
    assert {h: remote.get(h, "released") for h in mirror} == mirror
    assert set(remote) <= set(mirror)
    settled = [h for h, status in billing.transitions if status != "open"]
    assert len(settled) == len(set(settled)) == len(billing.holds)
    for gid in live:
        assert svc.queries.get(gid)["state"] in ("failed", "timed_out", "expired", "completed",
                                         "cancelled")


def test_a_process_dying_after_the_remote_reservation_leaks_no_hold(
        ext_world: World, billing: BillingStandIn, pg_engine: Engine) -> None:
    """The backend granted the hold, then the process died before our commit: the pending
    row survives the crash and the reaper releases the remote hold."""
    from datetime import UTC, datetime

    from persistence.uow import SqlUnitOfWork
    from saga.ports import HoldRequest

    billing.open_account("u-1", "free", "10.00")
    client = HttpBillingClient(billing.url, timeout=0.5, attempts=2, backoff=0.01)
    at = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
    uow = SqlUnitOfWork(pg_engine, functools.partial(ExternalBilling, client=client))
    with uow:
        uow.billing.reserve(HoldRequest("h-crash", "u-1", "g-1", "samples",
                                        Decimal("0.25"), at), quota=None, month="2026-11")
        uow.billing.abandon = lambda: None  # type: ignore[method-assign] # the process dies
    assert billing.status_counts() == {"open": 1}
    with pg_engine.connect() as conn:  # our commit never happened, the pending row did
        assert conn.execute(select(holds.c.status)).scalars().all() == ["pending"]

    assert reap_pending_holds(pg_engine, client, at + PENDING_GRACE / 2) == 0  # still young
    assert reap_pending_holds(pg_engine, client, at + PENDING_GRACE * 2) == 1
    assert billing.status_counts() == {"released": 1}
    assert billing.accounts["u-1"]["available"] == Decimal("10.00")
    with pg_engine.connect() as conn:
        assert conn.execute(select(holds.c.status)).scalars().all() == ["released"]
    assert reap_pending_holds(pg_engine, client, at + PENDING_GRACE * 3) == 0
    client.close()


def test_a_refused_reservation_is_settled_by_the_reaper(
        ext_world: World, billing: BillingStandIn) -> None:
    """A 402 leaves nothing held remotely; the pending row stays until the reaper has made
    sure no late reservation request can still land, then it is released."""
    billing.open_account("u-1", "free", "0.10")
    with pytest.raises(InsufficientCredits):
        start(ext_world)
    with ext_world.engine.connect() as conn:
        assert conn.execute(select(holds.c.status)).scalars().all() == ["pending"]
    client = HttpBillingClient(billing.url)
    assert reap_pending_holds(ext_world.engine, client,
                              ext_world.clock.now + PENDING_GRACE * 2) == 1
    client.close()
    with ext_world.engine.connect() as conn:
        assert conn.execute(select(holds.c.status)).scalars().all() == ["released"]
    assert billing.holds == {}
