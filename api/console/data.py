"""Every read the console (and the diagram view) makes, in one place.

The console pages never touch the service or the database themselves: they call these
functions, so when the service's queries move or grow (the attention list, the dead-letter
store) only this module changes. Reads the service has no query for yet (counts per state, a
user's open holds and journal) are done here, read-only, on a unit of work's connection; they
go away when the service offers them.

All functions block (they call the database); the routes run them in a worker thread.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select

from api.asset_links import S3Links, with_download_urls
from persistence.tables import generations, holds, journal
from saga.errors import NotFound
from saga.machine import STATES
from saga.model import TERMINAL_STATES as TERMINAL
from saga.pricing import fmt
from saga.queries import Queries

PAGE_SIZE = 20


@dataclass
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass
class Attention:
    """The attention list; ``available`` is False until the service can park sagas."""

    available: bool
    items: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DeadLetters:
    """Dead letters; ``available`` is False until the service keeps its own store of them."""

    available: bool
    items: list[dict[str, Any]] = field(default_factory=list)


class BadCursor(ValueError):
    pass


def encode_cursor(after: tuple[datetime, str]) -> str:
    raw = json.dumps([after[0].isoformat(), after[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, last_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None or not isinstance(last_id, str):
            raise ValueError
        return parsed, last_id
    except Exception as exc:  # any malformed cursor is the caller's mistake
        raise BadCursor("not a cursor from this console") from exc


def search_generations(service: Queries, *, user_id: str | None = None,
                       state: str | None = None, since: datetime | None = None,
                       until: datetime | None = None, cursor: str | None = None,
                       limit: int = PAGE_SIZE) -> Page:
    """Newest first. ``since``/``until`` bound ``created_at`` (both inclusive)."""
    after = decode_cursor(cursor) if cursor else None
    if until is not None:
        bound = (until + timedelta(microseconds=1), "")
        if after is None or bound[0] < after[0]:
            after = bound
    items, next_after = service.list_generations(user_id=user_id, state=state, limit=limit,
                                                 after=after)
    if since is not None:
        kept = [g for g in items if datetime.fromisoformat(g["created_at"]) >= since]
        if len(kept) < len(items):
            next_after = None  # newest first: everything further on is older still
        items = kept
    return Page(items, encode_cursor(next_after) if next_after else None)


def generation(service: Queries, generation_id: str,
               links: S3Links | None = None) -> dict[str, Any]:
    """The Generation resource (with s3 download links when ``links``); raises ``NotFound``."""
    return with_download_urls(service.get(generation_id), links)


def history(service: Queries, generation_id: str) -> dict[str, Any]:
    """``{id, state, events}``; raises ``NotFound``."""
    return service.history(generation_id)


def account(service: Queries, user_id: str) -> dict[str, Any]:
    """The Account resource; raises ``NotFound``."""
    return service.account(user_id)


def attention(service: Queries) -> Attention:
    """Parked sagas, oldest first (the first 50; the API pages through all of them)."""
    lister = getattr(service, "attention", None)
    if lister is None:
        return Attention(available=False)
    items, _cursor = lister(limit=50, after=None)
    return Attention(available=True, items=list(items))


def dead_letters(service: Queries) -> DeadLetters:
    """Open dead letters (dead-lettered results, unroutable messages), newest first."""
    lister = getattr(service, "dead_letters", None)
    if lister is None:
        return DeadLetters(available=False)
    items, _cursor = lister(limit=50, after=None)
    return DeadLetters(available=True, items=list(items))


# ------------------------------------------------------------- reads with no service query yet
def _read(service: Queries) -> Any:
    return service.uow_factory()


def _conn(uow: Any) -> Connection | None:
    conn = getattr(uow, "conn", None)
    return conn if isinstance(conn, Connection) else None


def state_counts(service: Queries) -> dict[str, int]:
    """How many generations are in each state (every state listed, zeros included)."""
    counts = dict.fromkeys(STATES, 0)
    with _read(service) as uow:
        conn = _conn(uow)
        if conn is None:
            return counts
        rows = conn.execute(select(generations.c.state, func.count())
                            .group_by(generations.c.state))
        for state, count in rows:
            counts[str(state)] = int(count)
    return counts


def _hold_row(row: Any) -> dict[str, Any]:
    return {"hold_id": row.hold_id, "generation_id": row.generation_id, "stage": row.stage,
            "amount": fmt(_cents(row.amount_cents)), "status": row.status,
            "created_at": _iso(row.created_at), "settled_at": _iso(row.settled_at)}


def open_holds(service: Queries, *, user_id: str | None = None,
               generation_id: str | None = None) -> list[dict[str, Any]]:
    """Holds not settled yet (``open``, or ``pending`` with external billing), oldest first."""
    with _read(service) as uow:
        conn = _conn(uow)
        if conn is None:
            return []
        query = select(holds).where(holds.c.status.in_(("open", "pending")))
        if user_id is not None:
            query = query.where(holds.c.user_id == user_id)
        if generation_id is not None:
            query = query.where(holds.c.generation_id == generation_id)
        return [_hold_row(r) for r in conn.execute(query.order_by(holds.c.created_at))]


def account_journal(service: Queries, user_id: str, limit: int = 100
                    ) -> list[dict[str, Any]]:
    """The account's journal, newest first."""
    with _read(service) as uow:
        conn = _conn(uow)
        if conn is None:
            return []
        rows = conn.execute(select(journal).where(journal.c.user_id == user_id)
                            .order_by(journal.c.id.desc()).limit(limit))
        return [{"at": _iso(r.at), "kind": r.kind,
                 "balance_delta": fmt(_cents(r.balance_delta_cents)),
                 "held_delta": fmt(_cents(r.held_delta_cents)), "hold_id": r.hold_id,
                 "generation_id": r.generation_id, "reason": r.reason} for r in rows]


def is_terminal(state: str) -> bool:
    return state in TERMINAL


def _cents(cents: int) -> Any:
    from persistence.ledger import from_cents

    return from_cents(int(cents))


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.isoformat().replace("+00:00", "Z")


__all__ = ["Attention", "BadCursor", "DeadLetters", "NotFound", "Page", "account",
           "account_journal", "attention", "dead_letters", "generation", "history",
           "open_holds", "search_generations", "state_counts"]
