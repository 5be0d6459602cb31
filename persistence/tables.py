"""Table definitions (SQLAlchemy Core). Alembic migrations in ``migrations/`` create them.

Money is stored as integer cents (``BIGINT``): exact on both PostgreSQL and SQLite, whose
``NUMERIC`` is a float underneath. The domain converts to :class:`~decimal.Decimal`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite returns naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType: Any = JSON().with_variant(JSONB(), "postgresql")
BigId: Any = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

generations = Table(
    "generations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("state", String(32), nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("due_at", UTCDateTime, nullable=True),
    Column("body", JSONType, nullable=False),
    # Parking (migration 0003): set while a saga waits for support; the sweeper skips it.
    Column("attention_reason", String(1000), nullable=True),
    Column("attention_kind", String(16), nullable=True),  # timer | compensation | result
    Column("attention_since", UTCDateTime, nullable=True),
    Column("fire_failures", Integer, nullable=False, server_default=text("0")),
    Index(None, "user_id", "created_at", "id"),
    Index(None, "state", "created_at", "id"),
    Index(None, "created_at", "id"),
    Index(None, "due_at"),
    Index("ix_generations_attention", "attention_since", "id",
          postgresql_where=text("attention_since IS NOT NULL"),
          sqlite_where=text("attention_since IS NOT NULL")),
)

generation_events = Table(
    "generation_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("generation_id", String(36), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("trigger", String(32), nullable=True),
    Column("from_state", String(32), nullable=True),
    Column("to_state", String(32), nullable=True),
    Column("actor", String(16), nullable=False),
    Column("detail", JSONType, nullable=False),
    Column("trace_id", String(32), nullable=True),  # the trace it was written in
    UniqueConstraint("generation_id", "seq"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("exchange", String(128), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("message_id", String(36), nullable=False),
    Column("correlation_id", String(36), nullable=False),
    Column("type", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(255), nullable=True),
    Column("traceparent", String(55), nullable=True),  # W3C context of the writing span
    Index("ix_outbox_unsent", "id", postgresql_where=text("sent_at IS NULL"),
          sqlite_where=text("sent_at IS NULL")),
)

inbox = Table(
    "inbox",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("event_type", String(64), primary_key=True),
    Column("generation_id", String(36), nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Index(None, "received_at"),  # trimming walks it (persistence/housekeeping.py)
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(320), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("body", JSONType, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "created_at"),
)

accounts = Table(
    "accounts",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("plan", String(16), nullable=False),
    Column("balance_cents", BigInteger, nullable=False),
    Column("held_cents", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

holds = Table(
    "holds",
    metadata,
    Column("hold_id", String(36), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("generation_id", String(36), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    # pending (external billing asked, our commit not yet done) | open | committed | released
    Column("status", String(16), nullable=False),
    Column("month", String(7), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("settled_at", UTCDateTime, nullable=True),
    Index(None, "user_id", "stage", "month", "status"),
    Index(None, "generation_id"),
    Index("ix_holds_pending", "created_at", postgresql_where=text("status = 'pending'"),
          sqlite_where=text("status = 'pending'")),
)

# External billing only: a hold whose commit was sent to the backend (written on a side
# connection and committed *before* the remote call), deleted in the transaction that settles
# the hold. A row whose hold is still open means the remote commit may have happened while our
# transaction was lost: the hold must never be released then (docs/architecture.md, credits).
billing_commits_sent = Table(
    "billing_commits_sent",
    metadata,
    Column("hold_id", String(36), primary_key=True),
    Column("generation_id", String(36), nullable=False),
    Column("sent_at", UTCDateTime, nullable=False),
)

# Append-only: every change of an account's balance or held amount is one row here, so
# sum(balance_delta_cents) == balance_cents and sum(held_delta_cents) == held_cents.
journal = Table(
    "journal",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("user_id", String(64), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(16), nullable=False),  # grant | reserve | commit | release
    Column("balance_delta_cents", BigInteger, nullable=False),
    Column("held_delta_cents", BigInteger, nullable=False),
    Column("hold_id", String(36), nullable=True),
    Column("generation_id", String(36), nullable=True),
    Column("reason", String(255), nullable=True),
    Index(None, "user_id", "id"),
)

# Messages the service could not use (dead-lettered results, unroutable outbound messages),
# moved out of RabbitMQ so support can list, replay and discard them by id.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("message_key", String(255), nullable=False),  # dedup: one row per delivery
    Column("dead_lettered_at", UTCDateTime, nullable=False),
    Column("reason", String(1000), nullable=False),
    Column("exchange", String(128), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("generation_id", String(36), nullable=True),
    Column("body", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),  # open | replayed | discarded
    Column("resolved_at", UTCDateTime, nullable=True),
    Column("resolved_by", String(16), nullable=True),
    Column("resolved_reason", String(500), nullable=True),
    UniqueConstraint("message_key"),
    Index(None, "status", "dead_lettered_at", "id"),
    Index(None, "dead_lettered_at", "id"),
)
