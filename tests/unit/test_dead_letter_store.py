"""Storing a dead letter never depends on its generation's row being readable."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select, update

from persistence.tables import dead_letters, generations
from saga.commands import StoreDeadLetter
from tests.conftest import World
from tests.unit.handlers.helpers import fund, start


def test_a_dead_letter_for_a_saga_whose_row_cannot_be_loaded_is_still_stored(
        world: World) -> None:
    fund(world, "u-1")
    gen = start(world, "u-1")
    with world.engine.begin() as conn:  # a poisoned row: its body no longer loads
        conn.execute(update(generations).where(generations.c.id == gen["id"])
                     .values(body={"poisoned": True}))
    stored = world.bus.handle(StoreDeadLetter(
        message_key="dlq:m-1", dead_lettered_at=datetime.now(UTC),
        reason="processing_error: UnloadableSaga", exchange="creativeflow.generation",
        routing_key="generation.result.samples_ready", body=b"{}", generation_id=gen["id"]))
    assert stored is True
    with world.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(dead_letters)).scalar_one() == 1
