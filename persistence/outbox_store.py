"""The database side of the outbox relay: claim unsent rows, publish, keep what was confirmed.

One statement claims a batch and marks it sent, in a transaction that commits only after
the broker confirmed it: ``WITH claimed AS (SELECT … FOR UPDATE SKIP LOCKED) UPDATE outbox
SET sent_at … RETURNING …``. Until that commit the rows stay unsent for everyone else (other
readers see the committed row; other relays skip the locked one), and if the process dies
or the publish raises, the rollback leaves them exactly as they were, for the poll to find
again. The rows the broker did not confirm are unmarked before the commit (one more
statement, only then), with ``last_error`` and the attempt counted. Before, a batch was two
statements whatever happened: the SELECT, then an UPDATE of the confirmed ids.

``sent_at`` is therefore the time the batch was claimed, a few milliseconds before its
confirms; it is committed only once they arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import attrgetter

from sqlalchemy import Engine, bindparam, func, select, update

from persistence.tables import outbox
from saga.messages import OutboundMessage

# Built once: each poll only binds parameters (and hits SQLAlchemy's compiled cache).
_CLAIMED = (select(outbox.c.id).where(outbox.c.sent_at.is_(None)).order_by(outbox.c.id)
            .limit(bindparam("limit")).with_for_update(skip_locked=True).cte("claimed"))
# Only the columns a message needs come back (no timestamps to convert per row).
_CLAIM_AND_MARK = (update(outbox).where(outbox.c.id == _CLAIMED.c.id)
                   .values(sent_at=bindparam("now"), attempts=outbox.c.attempts + 1)
                   .returning(outbox.c.id, outbox.c.exchange, outbox.c.routing_key,
                              outbox.c.message_id, outbox.c.correlation_id, outbox.c.type,
                              outbox.c.body, outbox.c.traceparent))
# The attempt was counted by the claim; the row goes back to unsent.
_UNMARK_FAILED = (update(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True)))
                  .values(sent_at=None, last_error="not confirmed"))
_BY_ID = attrgetter("id")


class SqlOutboxStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def relay_batch(self, limit: int,
                    publish: Callable[[Sequence[OutboundMessage]], list[bool]]) -> int:
        now = datetime.now(UTC)
        with self.engine.connect() as conn, conn.begin():
            # RETURNING has no order: publish in the order the rows were written.
            rows = sorted(conn.execute(_CLAIM_AND_MARK, {"limit": limit, "now": now}),
                          key=_BY_ID)
            if not rows:
                return 0
            confirmed = publish([
                OutboundMessage(r.exchange, r.routing_key, r.message_id, r.correlation_id,
                                r.type, {}, payload=r.body.encode(), traceparent=r.traceparent)
                for r in rows
            ])
            failed = [r.id for r, ok in zip(rows, confirmed, strict=True) if not ok]
            if failed:
                conn.execute(_UNMARK_FAILED, {"ids": failed})
            return len(rows)

    def backlog(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(outbox)
                                    .where(outbox.c.sent_at.is_(None))).scalar_one())
