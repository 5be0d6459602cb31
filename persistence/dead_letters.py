"""The dead-letter store: messages the service could not use, kept in its own table.

Dead-lettered results (from ``orchestrator.generation.results.dlq``) and unroutable outbound
messages land here, so support can list them and replay or discard each one by id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, or_, select, update

from persistence.sql import insert_ignore
from persistence.tables import dead_letters
from saga.ports import DeadLetter


def _letter(row: Any) -> DeadLetter:
    return DeadLetter(row.id, row.dead_lettered_at, row.reason, row.exchange, row.routing_key,
                      row.generation_id, bytes(row.body), row.status, row.resolved_at,
                      row.resolved_by, row.resolved_reason)


class SqlDeadLetters:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def add(self, letter: DeadLetter, message_key: str) -> bool:
        # ON CONFLICT DO NOTHING covers every unique constraint: a second copy of the same
        # delivery conflicts on ``message_key`` (its id is new) and is not stored.
        return insert_ignore(self.conn, dead_letters, {
            "id": letter.id, "message_key": message_key,
            "dead_lettered_at": letter.dead_lettered_at, "reason": letter.reason,
            "exchange": letter.exchange, "routing_key": letter.routing_key,
            "generation_id": letter.generation_id, "body": letter.body,
            "status": letter.status})

    def get(self, dead_letter_id: str, *, for_update: bool = False) -> DeadLetter | None:
        query = select(dead_letters).where(dead_letters.c.id == dead_letter_id)
        row = self.conn.execute(query.with_for_update() if for_update else query).first()
        return _letter(row) if row else None

    def resolve(self, dead_letter_id: str, status: str, at: datetime, by: str,
                reason: str) -> None:
        self.conn.execute(update(dead_letters).where(dead_letters.c.id == dead_letter_id)
                          .values(status=status, resolved_at=at, resolved_by=by,
                                  resolved_reason=reason))

    def open_for_generation(self, generation_id: str) -> list[DeadLetter]:
        query = (select(dead_letters).where(dead_letters.c.generation_id == generation_id,
                                            dead_letters.c.status == "open")
                 .order_by(dead_letters.c.dead_lettered_at, dead_letters.c.id)
                 .with_for_update())
        return [_letter(r) for r in self.conn.execute(query)]

    def search(self, *, status: str | None, limit: int,
               after: tuple[datetime, str] | None) -> list[DeadLetter]:
        query = select(dead_letters)
        if status is not None:
            query = query.where(dead_letters.c.status == status)
        if after is not None:
            at, last_id = after
            query = query.where(or_(dead_letters.c.dead_lettered_at < at,
                                    and_(dead_letters.c.dead_lettered_at == at,
                                         dead_letters.c.id < last_id)))
        query = query.order_by(dead_letters.c.dead_lettered_at.desc(),
                               dead_letters.c.id.desc()).limit(limit)
        return [_letter(r) for r in self.conn.execute(query)]
