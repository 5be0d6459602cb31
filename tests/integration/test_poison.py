"""Poison never stalls anything (PostgreSQL, real sweeper threads).

A saga whose row no longer loads is due *first*; the 50 healthy sagas due just after it must
still fire on time, and the poisoned one must be parked (not claimed again and again).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update

from aigen.jobs.sweeper import Sweeper
from persistence.tables import generation_events, generations
from persistence.uow import SqlUnitOfWork
from saga.commands import Grant, StartGeneration
from saga.messagebus import MessageBus
from tests.conftest import TEST_CONFIG

pytestmark = pytest.mark.integration
FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}
HEALTHY = 50


def _bus(engine: Engine) -> MessageBus:
    return MessageBus(lambda: SqlUnitOfWork(engine), TEST_CONFIG)


def _start(bus: MessageBus, user: str) -> str:
    bus.handle(Grant(user, __import__("decimal").Decimal("1.00"), "test"))
    gen: dict[str, Any] = bus.handle(StartGeneration(user_id=user, prompt="p", format=FORMAT))
    return str(gen["id"])


def _states(engine: Engine, ids: list[str]) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(select(generations.c.id, generations.c.state)
                            .where(generations.c.id.in_(ids)))
        return {r.id: r.state for r in rows}


def test_a_poisoned_saga_due_first_never_delays_fifty_healthy_deadlines(
        pg_engine: Engine) -> None:
    bus = _bus(pg_engine)
    poisoned = _start(bus, "poison")
    healthy = [_start(bus, f"h-{i}") for i in range(HEALTHY)]
    now = datetime.now(UTC)
    with pg_engine.begin() as conn:
        # The poisoned row: its body no longer loads into a Generation (no prompt, no format).
        conn.execute(update(generations).where(generations.c.id == poisoned)
                     .values(body={"garbage": True}, due_at=now - timedelta(seconds=30)))
        conn.execute(update(generations).where(generations.c.id.in_(healthy))
                     .values(due_at=now - timedelta(seconds=1)))

    sweepers = [Sweeper(bus, pg_engine, interval=0.05) for _ in range(2)]
    for sweeper in sweepers:
        sweeper.start()
    started = time.monotonic()
    try:
        deadline = started + 15
        while time.monotonic() < deadline:
            states = _states(pg_engine, healthy)
            if all(s == "timed_out" for s in states.values()):
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        for sweeper in sweepers:
            sweeper.stop()

    states = _states(pg_engine, healthy)
    stalled = [gid for gid, s in states.items() if s != "timed_out"]
    assert stalled == [], f"{len(stalled)} healthy sagas stalled behind the poisoned one"
    assert elapsed < 10  # on time: a sweep of 50 rows takes well under a second normally

    with pg_engine.connect() as conn:
        row = conn.execute(select(generations).where(generations.c.id == poisoned)).one()
        notes = conn.execute(select(generation_events.c.actor, generation_events.c.detail)
                             .where(generation_events.c.generation_id == poisoned,
                                    generation_events.c.kind == "note")).all()
        # Parked once, not claimed again: it keeps its state; its failure is on record.
        assert row.attention_kind == "timer" and row.attention_since is not None
        assert "UnloadableSaga" in row.attention_reason
        assert row.state == "processing_samples"
        assert [(n.actor, n.detail["kind"]) for n in notes] == [("system", "timer")]
        holds_open = conn.execute(text(
            "SELECT count(*) FROM holds WHERE generation_id = :g AND status = 'open'"),
            {"g": poisoned}).scalar()
        assert holds_open == 1  # a parked saga keeps its holds
