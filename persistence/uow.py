"""Repositories and the SQL unit of work (one database transaction per command)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, insert, or_, select, update

from persistence.attention import (
    attention_list,
    park_row,
    record_fire_failure,
    unpark_row,
)
from persistence.dead_letters import SqlDeadLetters
from persistence.ledger import SqlLedger
from persistence.sql import insert_ignore
from persistence.tables import generation_events, generations, idempotency_keys, inbox, outbox
from saga import intents as it
from saga.errors import ConcurrencyConflict, UnloadableSaga
from saga.failures import FAILURE_LOG
from saga.messages import OutboundMessage, iso
from saga.model import Generation
from saga.ports import (
    Billing,
    DeadLetterStore,
    GenerationRepository,
    HistoryRepository,
    IdempotencyRace,
    IdempotencyRecord,
    IdempotencyStore,
    Inbox,
    Outbox,
)
from saga.values import Compensation, Hold, SagaError

# Saga attributes kept in the JSON body (the rest are columns or transient).
_BODY_FIELDS = (
    "project_id", "prompt", "negative_prompt", "format", "style", "brand", "input_assets",
    "sample_count", "metadata", "samples", "selected_sample_id", "resolution", "final_asset",
    "error", "stage", "attempt", "job_id", "hold", "round", "due_kind", "compensation",
    "history_seq", "due_traceparent",
)
_MONEY_FIELDS = ("held", "charged", "released")


# Value-typed saga attributes and how they read back from the JSON body.
_VALUE_FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "hold": Hold.from_json, "compensation": Compensation.from_json,
    "error": SagaError.from_json,
}


def saga_to_row(saga: Generation) -> dict[str, Any]:
    body = {name: getattr(saga, name) for name in _BODY_FIELDS}
    for name in _VALUE_FIELDS:
        value = body[name]
        body[name] = value.to_json() if value is not None else None
    body.update({name: str(getattr(saga, name)) for name in _MONEY_FIELDS})
    return {
        "id": saga.id, "user_id": saga.user_id, "state": saga.state,
        "created_at": saga.created_at, "updated_at": saga.updated_at or saga.created_at,
        "due_at": saga.due_at, "body": body,
    }


def saga_from_row(row: Any) -> Generation:
    body = dict(row.body)
    for name in _MONEY_FIELDS:
        body[name] = Decimal(body.get(name, "0.00"))
    for name, load in _VALUE_FIELDS.items():
        if body.get(name) is not None:
            body[name] = load(body[name])
    known = {k: v for k, v in body.items() if k in _BODY_FIELDS or k in _MONEY_FIELDS}
    return Generation(
        id=row.id, user_id=row.user_id, state=row.state, version=row.version,
        created_at=row.created_at, updated_at=row.updated_at, due_at=row.due_at, **known,
        attention=attention_of(row),
    )


def attention_of(row: Any) -> dict[str, Any] | None:
    """The ``attention`` field of the Generation resource, from a generations row."""
    since = getattr(row, "attention_since", None)
    if since is None:
        return None
    return {"reason": row.attention_reason, "since": iso(since), "kind": row.attention_kind}


# What a corrupt body makes saga_from_row raise (missing or mistyped fields).
_LOAD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, ArithmeticError)

# Hot-path statements are built once; each execution only binds parameters.
_GET = select(generations).where(generations.c.id == bindparam("gid"))
_GET_FOR_UPDATE = _GET.with_for_update()
_INSERT_GENERATION = insert(generations)
_SAVE = (update(generations)
         .where(generations.c.id == bindparam("gid"),
                generations.c.version == bindparam("expected_version"))
         .values(state=bindparam("state"), version=bindparam("new_version"),
                 updated_at=bindparam("updated_at"), due_at=bindparam("due_at"),
                 body=bindparam("body"), fire_failures=0))
# The sweeper's claim: the earliest passed deadline of a saga that is not parked.
_CLAIM_DUE = (select(generations.c.id)
              .where(generations.c.due_at <= bindparam("now"),
                     generations.c.attention_since.is_(None))
              .order_by(generations.c.due_at).limit(1).with_for_update(skip_locked=True))


class SqlGenerations:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def get(self, generation_id: str, *, for_update: bool = False) -> Generation | None:
        row = self.conn.execute(_GET_FOR_UPDATE if for_update else _GET,
                                {"gid": generation_id}).first()
        if row is None:
            return None
        try:
            return saga_from_row(row)
        except _LOAD_ERRORS as exc:
            raise UnloadableSaga(generation_id, f"{type(exc).__name__}: {exc}") from exc

    def add(self, saga: Generation) -> None:
        self.conn.execute(_INSERT_GENERATION, {"version": 0, **saga_to_row(saga)})
        saga.version = 0

    def save(self, saga: Generation) -> None:
        row = saga_to_row(saga)
        result = self.conn.execute(_SAVE, {
            "gid": saga.id, "expected_version": saga.version, "new_version": saga.version + 1,
            "state": row["state"], "updated_at": row["updated_at"], "due_at": row["due_at"],
            "body": row["body"]})
        if result.rowcount != 1:
            raise ConcurrencyConflict(saga.id)
        saga.version += 1

    def claim_due(self, now: datetime) -> Generation | None:
        gid = self.conn.execute(_CLAIM_DUE, {"now": now}).scalar()
        if gid is None:
            return None
        try:
            row = self.conn.execute(_GET, {"gid": gid}).first()
            return saga_from_row(row)
        except _LOAD_ERRORS as exc:
            raise UnloadableSaga(gid, f"{type(exc).__name__}: {exc}") from exc

    # -- parking (plain SQL by id: works when the row cannot be loaded into a Generation) --
    def park(self, generation_id: str, kind: str, reason: str, now: datetime) -> bool:
        return park_row(self.conn, generation_id, kind, reason, now)

    def fire_failed(self, generation_id: str, retry_at: Callable[[int], datetime]) -> int:
        return record_fire_failure(self.conn, generation_id, retry_at)

    def unpark(self, generation_id: str, now: datetime, *, actor: str, reason: str,
               due_now: bool) -> bool | None:
        return unpark_row(self.conn, generation_id, now, actor=actor, reason=reason,
                          due_now=due_now)

    def attention(self, limit: int, after: tuple[datetime, str] | None
                  ) -> list[dict[str, Any]]:
        return attention_list(self.conn, limit, after)

    def search(self, *, user_id: str | None, state: str | None, limit: int,
             after: tuple[datetime, str] | None) -> list[Generation]:
        query = select(generations)
        if user_id is not None:
            query = query.where(generations.c.user_id == user_id)
        if state is not None:
            query = query.where(generations.c.state == state)
        if after is not None:
            at, last_id = after
            query = query.where(or_(generations.c.created_at < at,
                                    and_(generations.c.created_at == at,
                                         generations.c.id < last_id)))
        query = query.order_by(generations.c.created_at.desc(), generations.c.id.desc())
        found = []
        for row in self.conn.execute(query.limit(limit)):
            try:
                found.append(saga_from_row(row))
            except _LOAD_ERRORS as exc:  # one corrupt row must not take the listing down
                FAILURE_LOG.failed("listing generations",
                                   f"row {row.id} does not load ({type(exc).__name__}); "
                                   "left out (it is parked when its deadline fires)")
        return found


_INSERT_EVENT = insert(generation_events)
_INSERT_OUTBOX = insert(outbox)


class SqlHistory:
    """Buffers history rows; the unit of work writes them in one multi-row INSERT."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: list[dict[str, Any]] = []

    def append(self, generation_id: str, seq: int, at: datetime, entry: it.HistoryEntry) -> None:
        self.pending.append({
            "generation_id": generation_id, "seq": seq, "at": at, "kind": entry.kind,
            "trigger": entry.trigger, "from_state": entry.from_state,
            "to_state": entry.to_state, "actor": entry.actor, "detail": entry.detail,
            "trace_id": entry.trace_id})

    def flush(self) -> None:
        if self.pending:
            self.conn.execute(_INSERT_EVENT, self.pending)
            self.pending = []

    def events(self, generation_id: str) -> list[dict[str, Any]]:
        self.flush()
        rows = self.conn.execute(
            select(generation_events).where(generation_events.c.generation_id == generation_id)
            .order_by(generation_events.c.seq))
        return [
            {"seq": r.seq, "at": iso(r.at), "kind": r.kind, "trigger": r.trigger,
             "from_state": r.from_state, "to_state": r.to_state, "actor": r.actor,
             "detail": r.detail, "trace_id": r.trace_id}
            for r in rows
        ]


class SqlOutbox:
    """Buffers outbox rows; the unit of work writes them in one multi-row INSERT."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: list[dict[str, Any]] = []

    def add(self, message: OutboundMessage, at: datetime) -> None:
        self.pending.append({
            "exchange": message.exchange, "routing_key": message.routing_key,
            "message_id": message.message_id, "correlation_id": message.correlation_id,
            "type": message.type, "body": message.encode().decode(), "created_at": at,
            "attempts": 0, "traceparent": message.traceparent})

    def flush(self) -> None:
        if self.pending:
            self.conn.execute(_INSERT_OUTBOX, self.pending)
            self.pending = []


class SqlInbox:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def add(self, job_id: str, event_type: str, generation_id: str, at: datetime) -> bool:
        return insert_ignore(self.conn, inbox, {"job_id": job_id, "event_type": event_type,
                                                "generation_id": generation_id,
                                                "received_at": at})


_GET_KEY = select(idempotency_keys).where(idempotency_keys.c.scope == bindparam("scope"),
                                          idempotency_keys.c.key == bindparam("key"))


class SqlIdempotency:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def get(self, record: IdempotencyRecord) -> tuple[str, int, Any] | None:
        row = self.conn.execute(_GET_KEY, {"scope": record.scope, "key": record.key}).first()
        return (row.request_hash, row.status, row.body) if row else None

    def put(self, record: IdempotencyRecord, status: int, body: Any, at: datetime) -> None:
        if not insert_ignore(self.conn, idempotency_keys, {
            "scope": record.scope, "key": record.key, "request_hash": record.request_hash,
            "status": status, "body": body, "created_at": at,
        }):
            raise IdempotencyRace(record.key)


class SqlUnitOfWork:
    """One connection, one transaction; rolled back on exit unless committed."""

    def __init__(self, engine: Engine,
                 billing_factory: Callable[[Connection], Billing] = SqlLedger,
                 after_commit: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.billing_factory = billing_factory
        self.after_commit = after_commit

    def __enter__(self) -> SqlUnitOfWork:
        self.conn = self.engine.connect()
        self.tx = self.conn.begin()
        # Annotated with the ports: the protocol's attributes are invariant.
        self.generations: GenerationRepository = SqlGenerations(self.conn)
        self._history = SqlHistory(self.conn)
        self._outbox = SqlOutbox(self.conn)
        self.history: HistoryRepository = self._history
        self.outbox: Outbox = self._outbox
        self.inbox: Inbox = SqlInbox(self.conn)
        self.idempotency: IdempotencyStore = SqlIdempotency(self.conn)
        self.billing: Billing = self.billing_factory(self.conn)
        self.dead_letters: DeadLetterStore = SqlDeadLetters(self.conn)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.tx.is_active:
                self.tx.rollback()
                self.billing.abandon()
        finally:
            self.conn.close()

    def commit(self) -> None:
        self._history.flush()
        self._outbox.flush()
        self.tx.commit()
        if self.after_commit is not None:
            self.after_commit()

    def rollback(self) -> None:
        """Roll back, and undo what billing did outside the database (remote holds)."""
        if self.tx.is_active:
            self.tx.rollback()
            self.billing.abandon()
