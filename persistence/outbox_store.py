"""The database side of the outbox relay: claim unsent rows, publish, mark them sent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine, bindparam, func, select, update

from persistence.tables import outbox
from saga.messages import OutboundMessage

# Built once: each poll only binds parameters (and hits SQLAlchemy's compiled cache).
_CLAIM = (select(outbox).where(outbox.c.sent_at.is_(None)).order_by(outbox.c.id)
          .limit(bindparam("limit")).with_for_update(skip_locked=True))
_MARK_SENT = (update(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True)))
              .values(sent_at=bindparam("now"), attempts=outbox.c.attempts + 1))
_MARK_FAILED = (update(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True)))
                .values(attempts=outbox.c.attempts + 1, last_error="not confirmed"))


class SqlOutboxStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def relay_batch(self, limit: int,
                    publish: Callable[[Sequence[OutboundMessage]], list[bool]]) -> int:
        with self.engine.connect() as conn, conn.begin():
            rows = conn.execute(_CLAIM, {"limit": limit}).all()
            if not rows:
                return 0
            messages = [
                OutboundMessage(r.exchange, r.routing_key, r.message_id, r.correlation_id,
                                r.type, {}, payload=r.body.encode(), traceparent=r.traceparent)
                for r in rows
            ]
            confirmed = publish(messages)
            now = datetime.now(UTC)
            sent = [r.id for r, ok in zip(rows, confirmed, strict=True) if ok]
            failed = [r.id for r, ok in zip(rows, confirmed, strict=True) if not ok]
            if sent:
                conn.execute(_MARK_SENT, {"ids": sent, "now": now})
            if failed:
                conn.execute(_MARK_FAILED, {"ids": failed})
            return len(rows)

    def backlog(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(outbox)
                                    .where(outbox.c.sent_at.is_(None))).scalar_one())
