"""What the SQLite-tier handler tests share: the message bus on SQLite and the in-process
broker (``world``), results played by hand, views of history and credits.

Time is driven by ``world.clock`` and ``bus.handle(FireDeadlines())``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from persistence.tables import holds
from saga.commands import (
    ApplyResult,
    Grant,
    SelectSample,
    SetPlan,
    StartGeneration,
)
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


def iso_z(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def full_run(world: World) -> str:
    fund(world)
    gen, _ = to_awaiting(world)
    world.bus.handle(SelectSample(gen["id"], "s2", "high"))
    job = one_job(world)
    assert result(world, gen["id"], job["job_id"], FINAL_READY) == "applied"
    return str(gen["id"])
