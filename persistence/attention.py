"""Parking a saga for support, by id with plain SQL.

Nothing here loads the row into a :class:`~saga.model.Generation`: a saga is parked precisely
when that may be impossible (a corrupt body). Each function runs on the caller's connection,
inside the caller's transaction (the handlers open a fresh one for it). Parking bumps the
row's ``version``, so a writer holding an older copy conflicts and reloads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Text, and_, func, insert, or_, select, type_coerce, update

from persistence.tables import generation_events, generations
from saga.messages import iso

REASON_MAX = 1000


def _raw_body(conn: Connection, generation_id: str) -> tuple[Any, int] | None:
    """(body as parsed JSON or None when it is not JSON, version), row locked; None: no row."""
    row = conn.execute(
        select(type_coerce(generations.c.body, Text).label("body"), generations.c.version)
        .where(generations.c.id == generation_id).with_for_update()).first()
    if row is None:
        return None
    try:
        body = json.loads(row.body) if isinstance(row.body, str) else row.body
    except ValueError:
        body = None
    return body, int(row.version)


def _append_note(conn: Connection, generation_id: str, body: Any, at: datetime, actor: str,
                 detail: dict[str, Any]) -> dict[str, Any]:
    """Insert a ``note`` history row after the last one; the row's new column values."""
    seq_body = body.get("history_seq") if isinstance(body, dict) else None
    seq_rows = conn.execute(select(func.max(generation_events.c.seq))
                            .where(generation_events.c.generation_id == generation_id)
                            ).scalar() or 0
    seq = max(seq_rows, seq_body if isinstance(seq_body, int) else 0) + 1
    conn.execute(insert(generation_events).values(
        generation_id=generation_id, seq=seq, at=at, kind="note", trigger=None,
        from_state=None, to_state=None, actor=actor, detail=detail))
    return {"body": {**body, "history_seq": seq}} if isinstance(body, dict) else {}


def park_row(conn: Connection, generation_id: str, kind: str, reason: str,
             now: datetime) -> bool:
    """Park the saga (state, holds and due time untouched); False if unknown or parked."""
    found = _raw_body(conn, generation_id)
    if found is None:
        return False
    body, version = found
    parked = conn.execute(select(generations.c.attention_since)
                          .where(generations.c.id == generation_id)).scalar()
    if parked is not None:
        return False
    reason = reason[:REASON_MAX]
    values = _append_note(conn, generation_id, body, now, "system",
                          {"parked": True, "kind": kind, "reason": reason})
    conn.execute(update(generations).where(generations.c.id == generation_id).values(
        attention_reason=reason, attention_kind=kind, attention_since=now,
        version=version + 1, **values))
    return True


def record_fire_failure(conn: Connection, generation_id: str,
                        retry_at: Callable[[int], datetime],
                        note: dict[str, Any] | None = None, at: datetime | None = None) -> int:
    """Count one more failed firing and push the deadline by the backoff; the new count.

    ``note``: also add a ``note`` history row at ``at`` with this detail and ``attempt``."""
    failures = conn.execute(select(generations.c.fire_failures)
                            .where(generations.c.id == generation_id).with_for_update()
                            ).scalar()
    if failures is None:
        return 0
    failures = int(failures) + 1
    values: dict[str, Any] = {}
    if note is not None:
        found = _raw_body(conn, generation_id)
        if found is not None:
            values = _append_note(conn, generation_id, found[0], at or datetime.now(UTC), "system",
                                  {**note, "attempt": failures})
    conn.execute(update(generations).where(generations.c.id == generation_id).values(
        fire_failures=failures, due_at=retry_at(failures), version=generations.c.version + 1,
        **values))
    return failures


def unpark_row(conn: Connection, generation_id: str, now: datetime, *, actor: str,
               reason: str, due_now: bool, note: dict[str, Any] | None = None) -> bool | None:
    """Clear ``attention`` with a ``note``; ``due_now`` makes the parked timer fire now.

    None: no such saga; False: it is not parked."""
    found = _raw_body(conn, generation_id)
    if found is None:
        return None
    body, version = found
    row = conn.execute(select(generations.c.attention_since, generations.c.attention_kind,
                              generations.c.due_at)
                       .where(generations.c.id == generation_id)).first()
    if row is None or row.attention_since is None:
        return False
    values = _append_note(conn, generation_id, body, now, actor,
                          {"unparked": True, "kind": row.attention_kind, "reason": reason,
                           **(note or {})})
    extra: dict[str, Any] = {}
    # A parked timer or compensation runs again now. A result's step is the message itself
    # (the caller replays it from the dead letters); its saga's own deadline stays as it was.
    if due_now and row.due_at is not None and row.attention_kind != "result":
        extra["due_at"] = now
    conn.execute(update(generations).where(generations.c.id == generation_id).values(
        attention_reason=None, attention_kind=None, attention_since=None, fire_failures=0,
        version=version + 1, **values, **extra))
    return True


def attention_list(conn: Connection, limit: int, after: tuple[datetime, str] | None
                   ) -> list[dict[str, Any]]:
    """Parked sagas, oldest first, after the ``(since, id)`` cursor."""
    query = select(generations.c.id, generations.c.user_id, generations.c.state,
                   generations.c.attention_reason, generations.c.attention_kind,
                   generations.c.attention_since).where(
        generations.c.attention_since.is_not(None))
    if after is not None:
        at, last_id = after
        query = query.where(or_(generations.c.attention_since > at,
                                and_(generations.c.attention_since == at,
                                     generations.c.id > last_id)))
    rows = conn.execute(query.order_by(generations.c.attention_since, generations.c.id)
                        .limit(limit))
    return [{"generation_id": r.id, "user_id": r.user_id, "state": r.state,
             "attention": {"reason": r.attention_reason, "since": iso(r.attention_since),
                           "kind": r.attention_kind},
             "_since": r.attention_since} for r in rows]
