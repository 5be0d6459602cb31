"""Trimming tables that only grow: answered idempotency keys, sent outbox rows, old inbox keys.

Retention is chosen so that nothing still useful goes: keys are replayed for at least the
contract's 24 h, an outbox row is kept a day after it was confirmed (for support), and an
inbox key outlives any redelivery RabbitMQ could still make.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, delete

from persistence.tables import idempotency_keys, inbox, outbox

IDEMPOTENCY_RETENTION = timedelta(hours=48)
SENT_OUTBOX_RETENTION = timedelta(hours=24)
INBOX_RETENTION = timedelta(days=7)


def purge(engine: Engine, now: datetime) -> dict[str, int]:
    """Delete what has outlived its retention; returns the rows deleted per table."""
    with engine.begin() as conn:
        return {
            "idempotency_keys": conn.execute(delete(idempotency_keys).where(
                idempotency_keys.c.created_at < now - IDEMPOTENCY_RETENTION)).rowcount,
            "outbox": conn.execute(delete(outbox).where(
                outbox.c.sent_at < now - SENT_OUTBOX_RETENTION)).rowcount,
            "inbox": conn.execute(delete(inbox).where(
                inbox.c.received_at < now - INBOX_RETENTION)).rowcount,
        }
