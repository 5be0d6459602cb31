"""Trimming tables that only grow: answered idempotency keys, sent outbox rows, old inbox keys.

Retention is chosen so that nothing still useful goes: keys are replayed for at least the
contract's 24 h, an outbox row is kept a day after it was confirmed (for support), and an
inbox key outlives any redelivery RabbitMQ could still make.

Trimming is done in bounded steps, never in one statement: a step deletes at most ``batch``
rows of each table, each table in its own short transaction, and walks the table in index
order from where the previous step stopped (a keyset cursor), so a step reads about
``batch`` index entries however large the table or the backlog is. A backlog (the first
start on a large database, a service that was down for days) is then trimmed a step per
sweep, between deadline firings, instead of in one transaction that deletes millions of rows
while requests and the sweeper wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, select

from persistence.tables import idempotency_keys, inbox, outbox

IDEMPOTENCY_RETENTION = timedelta(hours=48)
SENT_OUTBOX_RETENTION = timedelta(hours=24)
INBOX_RETENTION = timedelta(days=7)
PURGE_BATCH = 2000
TABLES = ("idempotency_keys", "outbox", "inbox")


@dataclass
class Purge:
    """One round of trimming, taken a step at a time (:meth:`step`).

    The round's cut-offs are fixed when it starts; each table keeps its own cursor and is
    done once its walk reaches rows that are still kept.
    """

    now: datetime
    batch: int = PURGE_BATCH
    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    _after: dict[str, Any] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return len(self._done) == len(TABLES)

    def step(self, engine: Engine) -> dict[str, int]:
        """Delete at most ``batch`` rows of each table not done yet; the rows deleted."""
        step: dict[str, int] = {}
        for name in TABLES:
            if name in self._done:
                continue
            with engine.begin() as conn:
                n, after, more = _STEPS[name](conn, self.now, self._after.get(name), self.batch)
            step[name] = n
            self.deleted[name] += n
            self._after[name] = after
            if not more:
                self._done.add(name)
        return step


def purge(engine: Engine, now: datetime, batch: int = PURGE_BATCH) -> dict[str, int]:
    """A whole round: delete what has outlived its retention; the rows deleted per table."""
    rnd = Purge(now, batch)
    while not rnd.finished:
        rnd.step(engine)
    return rnd.deleted


def _by_time(table: Any, at: Any, retention: timedelta) -> Any:
    """A step for a table whose rows are deleted by an indexed timestamp alone."""

    def step(conn: Connection, now: datetime, after: datetime | None,
             batch: int) -> tuple[int, datetime | None, bool]:
        old = at < now - retention
        if after is not None:
            old = and_(old, at >= after)
        window = select(at).where(old).order_by(at).limit(batch).subquery()
        upto, seen = conn.execute(select(func.max(window.c[at.name]), func.count())).one()
        if not seen:
            return 0, after, False
        bounds = and_(old, at <= upto)
        n = conn.execute(delete(table).where(bounds)).rowcount
        # Rows sharing ``upto`` are all gone now; ``>= upto`` next time finds only newer ones.
        return n, upto, seen == batch

    return step


def _outbox_step(conn: Connection, now: datetime, after: int | None,
                 batch: int) -> tuple[int, int | None, bool]:
    """Sent rows, walked in id order: ``sent_at`` has no index (an unsent row is the only
    kind the relay looks for), ids grow with time, and unsent rows are never deleted."""
    cut = now - SENT_OUTBOX_RETENTION
    window = select(outbox.c.id, outbox.c.created_at)
    if after is not None:
        window = window.where(outbox.c.id > after)
    w = window.order_by(outbox.c.id).limit(batch).subquery()
    upto, oldest, seen = conn.execute(
        select(func.max(w.c.id), func.min(w.c.created_at), func.count())).one()
    if not seen:
        return 0, after, False
    in_window = outbox.c.id <= upto if after is None else and_(outbox.c.id > after,
                                                              outbox.c.id <= upto)
    n = conn.execute(delete(outbox).where(in_window, outbox.c.sent_at < cut)).rowcount
    # A row created after the cut cannot have been sent before it. Once a whole window is
    # newer than the cut the walk has reached the rows that are kept: ids grow with time
    # (a row of a transaction that committed late waits for the next round).
    reached_kept = oldest is not None and oldest >= cut
    return n, upto, seen == batch and not reached_kept


_STEPS: dict[str, Any] = {
    "idempotency_keys": _by_time(idempotency_keys, idempotency_keys.c.created_at,
                                 IDEMPOTENCY_RETENTION),
    "outbox": _outbox_step,
    "inbox": _by_time(inbox, inbox.c.received_at, INBOX_RETENTION),
}
