"""Repositories and the SQL unit of work (one database transaction per command).

Over 300 lines on purpose: the unit of work, its repositories and PostgreSQL's
one-statement write path share one connection and one transaction's story.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, insert, or_, select, update

from persistence.attention import (
    attention_list,
    park_row,
    record_fire_failure,
    unpark_row,
)
from persistence.dead_letters import SqlDeadLetters
from persistence.ledger import LedgerWrites, LockedAccount, SqlLedger
from persistence.sql import insert_ignore, json_dumps
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
    Prefetch,
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

def unloadable(generation_id: str, exc: Exception, row: Any) -> UnloadableSaga:
    """The error for a row whose body does not load, with what its columns still say."""
    return UnloadableSaga(generation_id, f"{type(exc).__name__}: {exc}",
                          state=getattr(row, "state", None),
                          user_id=getattr(row, "user_id", None), attention=attention_of(row))


# Hot-path statements are built once; each execution only binds parameters.
_GET = select(generations).where(generations.c.id == bindparam("gid"))
_GET_FOR_UPDATE = _GET.with_for_update()
# A batch of results locks its sagas in one statement, in id order (no crosswise waits).
_GET_MANY = (select(generations).where(generations.c.id.in_(bindparam("gids", expanding=True)))
             .order_by(generations.c.id))
_GET_MANY_FOR_UPDATE = _GET_MANY.with_for_update()
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


# PostgreSQL statements sent with exec_driver_sql read rows without SQLAlchemy's column
# types: these columns come back as psycopg2 makes them and are normalised as UTCDateTime
# does (JSONB is decoded by the engine's json_deserializer, registered with psycopg2).
_GEN_READ = ("id", "user_id", "state", "version", "created_at", "updated_at", "due_at", "body",
             "attention_reason", "attention_kind", "attention_since")
_GEN_TIMES = frozenset(("created_at", "updated_at", "due_at", "attention_since"))
_GEN_SELECT = ", ".join(_GEN_READ)


def _driver_row(values: Any, prefix: str = "") -> SimpleNamespace:
    """A generations row read with exec_driver_sql, shaped as saga_from_row wants it."""
    row = {}
    for name in _GEN_READ:
        value = getattr(values, prefix + name)
        if name in _GEN_TIMES and value is not None:
            value = value.astimezone(UTC)
        row[name] = value
    return SimpleNamespace(**row)


def _get_many_with_holds(n: int) -> str:
    """Lock ``n`` sagas in id order and, with them, the open holds of those whose row did
    not move on between the statement's snapshot and its lock (``fresh``): every hold of a
    saga is made by a transaction that holds the saga's lock and writes its row, so for a
    fresh saga the snapshot shows all of its holds. The holds are locked too, so a command
    that settles one knows now that it is open and can write the settling with its saga."""
    ids = ", ".join(["%s"] * n)
    return (f"WITH g AS MATERIALIZED (SELECT {_GEN_SELECT}, ctid AS t FROM generations "
            f"WHERE id IN ({ids}) ORDER BY id FOR UPDATE), "
            f"gs AS (SELECT id, ctid AS t FROM generations WHERE id IN ({ids})), "
            # The ids listed again: an index scan on holds whatever the statistics say.
            "h AS MATERIALIZED (SELECT hold_id, generation_id, user_id, amount_cents "
            f"FROM holds WHERE generation_id IN ({ids}) AND generation_id IN "
            "(SELECT id FROM g) AND status = 'open' ORDER BY hold_id FOR UPDATE) "
            f"SELECT {', '.join('g.' + c for c in _GEN_READ)}, g.t = gs.t AS fresh, "
            "(SELECT json_agg(json_build_array(h.hold_id, h.user_id, h.amount_cents)) "
            "FROM h WHERE h.generation_id = g.id) AS open_holds "
            "FROM g LEFT JOIN gs ON gs.id = g.id ORDER BY g.id")


class SqlGenerations:
    """Sagas by id. On PostgreSQL ``add``/``save`` are deferred to the unit of work's flush.

    A deferred write is serialised when it is made (later changes to the object are not
    written unless saved again), and the version check still fails the transaction: the
    flush raises :class:`ConcurrencyConflict` before the commit. Reads flush first.
    """

    def __init__(self, conn: Connection, writes: PendingWrites | None = None,
                 ledger: SqlLedger | None = None) -> None:
        self.conn = conn
        self.writes = writes
        # PostgreSQL with the built-in ledger: get_many also locks the sagas' open holds.
        self.ledger = ledger
        self.prefetched: dict[str, Any] = {}  # id -> row (None: absent), read and locked

    def get(self, generation_id: str, *, for_update: bool = False) -> Generation | None:
        if generation_id in self.prefetched:  # read and locked by the unit of work's prefetch
            row = self.prefetched.pop(generation_id)
        else:
            if self.writes is not None:
                self.writes.flush()
            row = self.conn.execute(_GET_FOR_UPDATE if for_update else _GET,
                                    {"gid": generation_id}).first()
        if row is None:
            return None
        try:
            return saga_from_row(row)
        except _LOAD_ERRORS as exc:
            raise unloadable(generation_id, exc, row) from exc

    def get_many(self, generation_ids: list[str], *, for_update: bool = False
                 ) -> dict[str, Generation]:
        if self.writes is not None:
            self.writes.flush()
        ids = sorted(set(generation_ids))
        if for_update and self.ledger is not None and ids:
            return self._get_many_with_holds(ids, self.ledger)
        found: dict[str, Generation] = {}
        for row in self.conn.execute(_GET_MANY_FOR_UPDATE if for_update else _GET_MANY,
                                     {"gids": ids}):
            try:
                found[row.id] = saga_from_row(row)
            except _LOAD_ERRORS as exc:
                raise UnloadableSaga(row.id, f"{type(exc).__name__}: {exc}") from exc
        return found

    def _get_many_with_holds(self, ids: list[str], ledger: SqlLedger) -> dict[str, Generation]:
        found: dict[str, Generation] = {}
        held: list[tuple[str, str, int, str]] = []
        for values in self.conn.exec_driver_sql(_get_many_with_holds(len(ids)),
                                                tuple(ids * 3)):
            row = _driver_row(values)
            try:
                found[row.id] = saga_from_row(row)
            except _LOAD_ERRORS as exc:
                raise UnloadableSaga(row.id, f"{type(exc).__name__}: {exc}") from exc
            if values.fresh:  # a saga that moved on meanwhile: its holds settle one by one
                held += [(hold_id, user_id, cents, row.id)
                         for hold_id, user_id, cents in values.open_holds or ()]
        ledger.adopt_open_holds(held)
        return found

    def add(self, saga: Generation) -> None:
        self.prefetched.pop(saga.id, None)
        if self.writes is not None:
            self.writes.saga(saga, insert=True)
        else:
            self.conn.execute(_INSERT_GENERATION, {"version": 0, **saga_to_row(saga)})
        saga.version = 0

    def save(self, saga: Generation) -> None:
        self.prefetched.pop(saga.id, None)
        if self.writes is not None:
            self.writes.saga(saga, insert=False)
            saga.version += 1
            return
        row = saga_to_row(saga)
        result = self.conn.execute(_SAVE, {
            "gid": saga.id, "expected_version": saga.version, "new_version": saga.version + 1,
            "state": row["state"], "updated_at": row["updated_at"], "due_at": row["due_at"],
            "body": row["body"]})
        if result.rowcount != 1:
            raise ConcurrencyConflict(saga.id)
        saga.version += 1

    def claim_due(self, now: datetime) -> Generation | None:
        self._flush()
        gid = self.conn.execute(_CLAIM_DUE, {"now": now}).scalar()
        if gid is None:
            return None
        row = self.conn.execute(_GET, {"gid": gid}).first()
        try:
            return saga_from_row(row)
        except _LOAD_ERRORS as exc:
            raise unloadable(gid, exc, row) from exc

    # -- parking (plain SQL by id: works when the row cannot be loaded into a Generation) --
    def park(self, generation_id: str, kind: str, reason: str, now: datetime) -> bool:
        self._flush()  # plain SQL on the row: the buffered write goes first
        return park_row(self.conn, generation_id, kind, reason, now)

    def fire_failed(self, generation_id: str, retry_at: Callable[[int], datetime],
                    note: dict[str, Any] | None = None, at: datetime | None = None) -> int:
        self._flush()  # plain SQL on the row: the buffered write goes first
        return record_fire_failure(self.conn, generation_id, retry_at, note, at)

    def unpark(self, generation_id: str, now: datetime, *, actor: str, reason: str,
               due_now: bool, note: dict[str, Any] | None = None) -> bool | None:
        self._flush()  # plain SQL on the row: the buffered write goes first
        return unpark_row(self.conn, generation_id, now, actor=actor, reason=reason,
                          due_now=due_now, note=note)

    def attention(self, limit: int, after: tuple[datetime, str] | None
                  ) -> list[dict[str, Any]]:
        self._flush()  # plain SQL on the row: the buffered write goes first
        return attention_list(self.conn, limit, after)

    def _flush(self) -> None:
        if self.writes is not None:
            self.writes.flush()

    def search(self, *, user_id: str | None, state: str | None, limit: int,
             after: tuple[datetime, str] | None) -> list[Generation]:
        if self.writes is not None:
            self.writes.flush()
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

    def __init__(self, conn: Connection, writes: PendingWrites | None = None) -> None:
        self.conn = conn
        self.writes = writes
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
        if self.writes is not None:
            self.writes.flush()
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

    def add_many(self, keys: list[tuple[str, str, str]], at: datetime) -> set[tuple[str, str]]:
        """PostgreSQL: one multi-row ``INSERT … ON CONFLICT DO NOTHING RETURNING``."""
        unique = list({(job, event): gid for job, event, gid in keys}.items())
        if not unique:
            return set()
        if self.conn.dialect.name != "postgresql":
            return {key for key, gid in unique if self.add(key[0], key[1], gid, at)}
        params: list[Any] = []
        for (job, event), gid in unique:
            params += [job, event, gid, at]
        rows = self.conn.exec_driver_sql(
            "INSERT INTO inbox (job_id, event_type, generation_id, received_at) VALUES "
            + ", ".join(["(%s, %s, %s, %s)"] * len(unique))
            + " ON CONFLICT DO NOTHING RETURNING job_id, event_type", tuple(params))
        return {(row[0], row[1]) for row in rows}


_GET_KEY = select(idempotency_keys).where(idempotency_keys.c.scope == bindparam("scope"),
                                          idempotency_keys.c.key == bindparam("key"))


class SqlIdempotency:
    def __init__(self, conn: Connection, writes: PendingWrites | None = None) -> None:
        self.conn = conn
        self.writes = writes
        self.prefetched: dict[tuple[str, str], tuple[str, int, Any] | None] = {}

    def get(self, record: IdempotencyRecord) -> tuple[str, int, Any] | None:
        key = (record.scope, record.key)
        if key in self.prefetched:  # read by the unit of work's prefetch
            return self.prefetched.pop(key)
        if self.writes is not None:
            self.writes.flush()
        row = self.conn.execute(_GET_KEY, {"scope": record.scope, "key": record.key}).first()
        return (row.request_hash, row.status, row.body) if row else None

    def put(self, record: IdempotencyRecord, status: int, body: Any, at: datetime) -> None:
        self.prefetched.pop((record.scope, record.key), None)
        if self.writes is not None:
            self.writes.idempotency(record, status, body, at)
            return
        if not insert_ignore(self.conn, idempotency_keys, {
            "scope": record.scope, "key": record.key, "request_hash": record.request_hash,
            "status": status, "body": body, "created_at": at,
        }):
            raise IdempotencyRace(record.key)


_GEN_COLS = "id, user_id, state, version, created_at, updated_at, due_at, body"
_EVENT_COLS = ('generation_id, seq, at, kind, "trigger", from_state, to_state, actor, detail, '
               "trace_id")
_EVENT_ROW = "(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
_OUTBOX_COLS = ("exchange, routing_key, message_id, correlation_id, type, body, created_at, "
                "attempts, traceparent")
_OUTBOX_ROW = "(%s, %s, %s, %s, %s, %s, %s, 0, %s)"


class PendingWrites:
    """PostgreSQL: a command's writes as one data-modifying CTE chain, one round trip.

    The saga INSERT or version-checked UPDATE, the history rows, the outbox rows and the
    stored idempotent response go in one statement (``WITH g AS (UPDATE … RETURNING 1),
    e AS (INSERT …), o AS (INSERT …), k AS (INSERT … ON CONFLICT DO NOTHING RETURNING 1)
    SELECT count(*) …``) inside the command's transaction. A failed version check raises
    :class:`ConcurrencyConflict`, a taken idempotency key :class:`IdempotencyRace`; either
    way the transaction is rolled back by the unit of work, so nothing of it stays.
    """

    def __init__(self, conn: Connection, history: SqlHistory, outbox: SqlOutbox) -> None:
        self.conn = conn
        self.history = history
        self.outbox = outbox
        # saga id -> (insert?, expected version, values)
        self.sagas: dict[str, tuple[bool, int, tuple[Any, ...]]] = {}
        self.keys: list[tuple[IdempotencyRecord, tuple[Any, ...]]] = []
        self.ledger = LedgerWrites()  # the built-in ledger's moves on locked rows

    def saga(self, saga: Generation, *, insert: bool) -> None:
        row = saga_to_row(saga)
        earlier = self.sagas.get(saga.id)
        if earlier is not None:  # saved again before the flush: one write, first version
            insert, expected = earlier[0], earlier[1]
        else:
            expected = saga.version
        new_version = 0 if earlier is None and insert else saga.version + 1
        self.sagas[saga.id] = (insert, expected, (
            row["state"], new_version, row["updated_at"], row["due_at"],
            json_dumps(row["body"]), saga.id, row["user_id"], row["created_at"]))

    def idempotency(self, record: IdempotencyRecord, status: int, body: Any,
                    at: datetime) -> None:
        self.keys.append((record, (record.scope, record.key, record.request_hash, status,
                                   json_dumps(body), at)))

    def flush(self) -> None:
        if not (self.sagas or self.history.pending or self.outbox.pending or self.keys
                or self.ledger):
            return
        ctes: list[str] = []
        params: list[Any] = []
        checks: list[tuple[str, int, Exception]] = []  # CTE, rows it must return, error
        for n, (saga_id, (is_new, expected, v)) in enumerate(self.sagas.items()):
            state, version, updated_at, due_at, body, _id, user_id, created_at = v
            if is_new:
                ctes.append(f"g{n} AS (INSERT INTO generations ({_GEN_COLS}) VALUES "
                            "(%s, %s, %s, %s, %s, %s, %s, %s::jsonb) RETURNING 1)")
                params += [saga_id, user_id, state, version, created_at, updated_at, due_at,
                           body]
            else:
                ctes.append(f"g{n} AS (UPDATE generations SET state = %s, version = %s, "
                            "updated_at = %s, due_at = %s, body = %s::jsonb "
                            "WHERE id = %s AND version = %s RETURNING 1)")
                params += [state, version, updated_at, due_at, body, saga_id, expected]
            checks.append((f"g{n}", 1, ConcurrencyConflict(saga_id)))
        if self.history.pending:
            ctes.append(f"e AS (INSERT INTO generation_events ({_EVENT_COLS}) VALUES "
                        + ", ".join([_EVENT_ROW] * len(self.history.pending)) + ")")
            for h in self.history.pending:
                params += [h["generation_id"], h["seq"], h["at"], h["kind"], h["trigger"],
                           h["from_state"], h["to_state"], h["actor"], json_dumps(h["detail"]),
                           h["trace_id"]]
        if self.outbox.pending:
            ctes.append(f"o AS (INSERT INTO outbox ({_OUTBOX_COLS}) VALUES "
                        + ", ".join([_OUTBOX_ROW] * len(self.outbox.pending)) + ")")
            for o in self.outbox.pending:
                params += [o["exchange"], o["routing_key"], o["message_id"],
                           o["correlation_id"], o["type"], o["body"], o["created_at"],
                           o["traceparent"]]
        self.ledger.ctes(ctes, params, checks)
        for n, (record, values) in enumerate(self.keys):
            ctes.append(f'k{n} AS (INSERT INTO idempotency_keys (scope, "key", request_hash, '
                        "status, body, created_at) VALUES (%s, %s, %s, %s, %s::jsonb, %s) "
                        "ON CONFLICT DO NOTHING RETURNING 1)")
            params += values
            checks.append((f"k{n}", 1, IdempotencyRace(record.key)))
        self.sagas, self.keys = {}, []
        self.history.pending, self.outbox.pending = [], []
        select_list = ", ".join(f"(SELECT count(*) FROM {name})" for name, _, _ in checks)
        row = self.conn.exec_driver_sql(
            "WITH " + ", ".join(ctes) + " SELECT " + (select_list or "1"), tuple(params)
        ).one()
        for (_, expected, error), count in zip(checks, row, strict=False):
            if count != expected:
                raise error


def _prefetch_statement(what: Prefetch, *, accounts: bool
                        ) -> tuple[str | None, dict[str, Any]]:
    """One SELECT for what a command reads first: its stored response (``k_*``), its saga
    locked (``g_*``), then the account it moves credits on locked (``a_*``) and the month's
    sample rounds (``r_n``).

    The round count is read in the statement's snapshot, which may predate the account's
    lock when that lock had to wait. Every change of a user's holds also writes their
    account row (in the transaction that holds its lock), so when the locked row version is
    the one the snapshot sees (``a_fresh``: same ``ctid``), no such change committed in
    between and the count is the one a statement after the lock would give; otherwise it is
    not used (the reservation counts again, under the lock).
    """
    ctes: list[str] = []
    cols: list[str] = []
    joins: list[str] = []
    params: dict[str, Any] = {}
    if what.idempotency is not None:
        ctes.append('k AS (SELECT request_hash, status, body FROM idempotency_keys '
                    'WHERE scope = %(scope)s AND "key" = %(key)s)')
        cols += ["k.request_hash AS k_hash", "k.status AS k_status", "k.body AS k_body"]
        joins.append("LEFT JOIN k ON true")
        params.update(scope=what.idempotency.scope, key=what.idempotency.key)
    owner: str | None = None
    if what.generation_id is not None:
        ctes.append(f"g AS MATERIALIZED (SELECT {_GEN_SELECT} FROM generations "
                    "WHERE id = %(gid)s FOR UPDATE)")
        cols += [f"g.{c} AS g_{c}" for c in _GEN_READ]
        joins.append("LEFT JOIN g ON true")
        params["gid"] = what.generation_id
        if what.owner_account:
            owner = "(SELECT user_id FROM g)"  # locked after the saga, as elsewhere
    if what.user_id is not None:
        owner = "%(uid)s"
        params["uid"] = what.user_id
    if accounts and owner is not None:
        ctes.append("a AS MATERIALIZED (SELECT user_id, plan, balance_cents, held_cents, "
                    f"ctid AS t FROM accounts WHERE user_id = {owner} FOR UPDATE)")
        ctes.append(f"s AS (SELECT ctid AS t FROM accounts WHERE user_id = {owner})")
        cols += ["a.user_id AS a_user", "a.plan AS a_plan", "a.balance_cents AS a_balance",
                 "a.held_cents AS a_held", "a.t = s.t AS a_fresh"]
        joins += ["LEFT JOIN a ON true", "LEFT JOIN s ON true"]
        if what.rounds_month is not None:
            ctes.append("r AS (SELECT count(*) AS n FROM holds WHERE user_id = "
                        f"{owner} AND stage = 'samples' AND month = %(month)s "
                        "AND status <> 'released')")
            cols.append("r.n AS r_n")
            joins.append("CROSS JOIN r")
            params["month"] = what.rounds_month
    if not ctes:
        return None, params
    return ("WITH " + ", ".join(ctes) + " SELECT " + ", ".join(cols)
            + " FROM (SELECT 1) AS one " + " ".join(joins)), params


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
        self._history = SqlHistory(self.conn)
        self._outbox = SqlOutbox(self.conn)
        # PostgreSQL: what the command writes goes in one statement at the flush.
        self._writes = (PendingWrites(self.conn, self._history, self._outbox)
                        if self.conn.dialect.name == "postgresql" else None)
        self._history.writes = self._writes
        billing = self.billing_factory(self.conn)
        # PostgreSQL and the built-in ledger: moves on rows this transaction locked are
        # written with the command's statement too.
        self._ledger = (billing if self._writes is not None and isinstance(billing, SqlLedger)
                        else None)
        if self._ledger is not None and self._writes is not None:
            self._ledger.attach(self._writes)
        self._generations = SqlGenerations(self.conn, self._writes, self._ledger)
        self._idempotency = SqlIdempotency(self.conn, self._writes)
        # Annotated with the ports: the protocol's attributes are invariant.
        self.generations: GenerationRepository = self._generations
        self.history: HistoryRepository = self._history
        self.outbox: Outbox = self._outbox
        self.inbox: Inbox = SqlInbox(self.conn)
        self.idempotency: IdempotencyStore = self._idempotency
        self.billing: Billing = billing
        self.dead_letters: DeadLetterStore = SqlDeadLetters(self.conn)
        return self

    def prefetch(self, what: Prefetch) -> None:
        """PostgreSQL: read (and lock) what the command names in one statement; the
        repositories then answer those reads from it. SQLite reads row by row."""
        if self._writes is None:
            return
        sql, params = _prefetch_statement(what, accounts=self._ledger is not None)
        if sql is None:
            return
        row = self.conn.exec_driver_sql(sql, params).one()
        if what.idempotency is not None:
            record = what.idempotency
            self._idempotency.prefetched[record.scope, record.key] = (
                None if row.k_status is None else (row.k_hash, row.k_status, row.k_body))
        owner = what.user_id
        if what.generation_id is not None:
            found = row.g_id is not None
            self._generations.prefetched[what.generation_id] = (
                _driver_row(row, "g_") if found else None)
            if owner is None and found and what.owner_account:
                owner = row.g_user_id
        if self._ledger is not None and owner is not None:
            rounds = ({what.rounds_month: int(row.r_n)}
                      if what.rounds_month is not None and row.a_fresh else {})
            self._ledger.adopt_account(owner, None if row.a_user is None else LockedAccount(
                row.a_plan, int(row.a_balance), int(row.a_held), rounds))

    def __exit__(self, *exc: object) -> None:
        try:
            if self.tx.is_active:
                self.tx.rollback()
                self.billing.abandon()
        finally:
            self.conn.close()

    def flush(self) -> None:
        """Write what is buffered (still inside the transaction)."""
        if self._writes is not None:
            self._writes.flush()
        self._history.flush()
        self._outbox.flush()

    def commit(self) -> None:
        self.flush()
        self.tx.commit()
        if self.after_commit is not None:
            self.after_commit()

    def rollback(self) -> None:
        """Roll back, and undo what billing did outside the database (remote holds)."""
        if self.tx.is_active:
            self.tx.rollback()
            self.billing.abandon()
