"""The relay's claim on PostgreSQL: rows are marked sent in the statement that claims them, in a
transaction that commits only after the broker confirmed them.

So until the confirms arrive nobody sees them sent and no other relay can take them; the
ones the broker did not confirm go back to unsent before the commit; a publish that raises,
or a process that dies while waiting for confirms, leaves every row exactly as it was, and the
next poll sends them. The same checks on SQLite are in ``tests/unit/test_relay_outcomes.py``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, insert, select

from persistence.outbox_store import SqlOutboxStore
from persistence.tables import outbox
from saga.messages import NOTIFICATION_EXCHANGE, OutboundMessage

AT = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


def add_rows(engine: Engine, n: int, prefix: str = "m") -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    with engine.begin() as conn:
        conn.execute(insert(outbox), [
            {"exchange": NOTIFICATION_EXCHANGE, "routing_key": f"notification.{m}",
             "message_id": m, "correlation_id": "g-1", "type": "GenerationNotification",
             "body": f'{{"id": "{m}"}}', "created_at": AT, "attempts": 0,
             "traceparent": None}
            for m in ids])
    return ids


def rows(engine: Engine) -> dict[str, tuple[bool, int, str | None]]:
    """message_id -> (sent, attempts, last_error), as any other connection sees them."""
    with engine.connect() as conn:
        return {r.message_id: (r.sent_at is not None, r.attempts, r.last_error)
                for r in conn.execute(select(outbox))}


def test_claimed_rows_stay_unsent_to_others_and_untakeable_until_confirmed(
        pg_engine: Engine) -> None:
    ids = add_rows(pg_engine, 12)
    store = SqlOutboxStore(pg_engine)
    seen: dict[str, object] = {}

    def publish(messages: Sequence[OutboundMessage]) -> list[bool]:
        # While "waiting for confirms": another connection, another relay.
        seen["rows"] = rows(pg_engine)
        other: list[int] = []
        t = threading.Thread(target=lambda: other.append(
            SqlOutboxStore(pg_engine).relay_batch(100, lambda ms: [True] * len(ms))))
        t.start()
        t.join(10)
        seen["other_claimed"] = other
        seen["published"] = [m.message_id for m in messages]
        seen["bodies"] = [m.encode() for m in messages]
        return [True] * len(messages)

    assert store.relay_batch(100, publish) == 12
    assert seen["published"] == ids  # in the order written
    assert seen["bodies"] == [f'{{"id": "{m}"}}'.encode() for m in ids]
    assert seen["rows"] == {m: (False, 0, None) for m in ids}
    assert seen["other_claimed"] == [0]  # SKIP LOCKED: not one of them
    assert rows(pg_engine) == {m: (True, 1, None) for m in ids}
    assert store.relay_batch(100, publish) == 0


def test_unconfirmed_rows_go_back_to_unsent_and_a_later_pass_sends_only_them(
        pg_engine: Engine) -> None:
    ids = add_rows(pg_engine, 6)
    store = SqlOutboxStore(pg_engine)
    nacked = {ids[1], ids[4]}
    assert store.relay_batch(100, lambda ms: [m.message_id not in nacked for m in ms]) == 6
    after = rows(pg_engine)
    assert {m for m, (sent, _, _) in after.items() if not sent} == nacked
    for m in nacked:
        assert after[m] == (False, 1, "not confirmed")
    again: list[str] = []

    def confirm(ms: Sequence[OutboundMessage]) -> list[bool]:
        again.extend(m.message_id for m in ms)
        return [True] * len(ms)

    assert store.relay_batch(100, confirm) == 2
    assert again == sorted(nacked)
    assert rows(pg_engine)[ids[1]] == (True, 2, "not confirmed")


def test_a_publish_that_raises_leaves_every_row_as_it_was(pg_engine: Engine) -> None:
    ids = add_rows(pg_engine, 3)
    store = SqlOutboxStore(pg_engine)

    def lost(ms: Sequence[OutboundMessage]) -> list[bool]:
        raise ConnectionError("connection lost while waiting for confirms")

    with pytest.raises(ConnectionError):
        store.relay_batch(100, lost)
    assert rows(pg_engine) == {m: (False, 0, None) for m in ids}
    assert store.relay_batch(100, lambda ms: [True] * len(ms)) == 3


DIES_WHILE_PUBLISHING = """
import os, sys
from persistence.db import make_engine
from persistence.outbox_store import SqlOutboxStore

def publish(messages):
    print(len(messages), flush=True)  # claimed and marked, not committed
    os._exit(9)  # the process dies before the broker's confirms arrive

SqlOutboxStore(make_engine(sys.argv[1], pool_size=1)).relay_batch(100, publish)
"""


def test_a_process_that_dies_waiting_for_confirms_leaves_its_rows_for_the_poll(
        pg_engine: Engine) -> None:
    ids = add_rows(pg_engine, 5)
    url = pg_engine.url.render_as_string(hide_password=False)
    died = subprocess.run([sys.executable, "-c", DIES_WHILE_PUBLISHING, url],
                          capture_output=True, text=True, timeout=60)
    assert died.returncode == 9, died.stderr
    assert died.stdout.strip() == "5"
    assert rows(pg_engine) == {m: (False, 0, None) for m in ids}
    sent: list[str] = []

    def confirm(ms: Sequence[OutboundMessage]) -> list[bool]:
        sent.extend(m.message_id for m in ms)
        return [True] * len(ms)

    # The dead backend's transaction is rolled back once PostgreSQL sees its connection
    # drop; until then SKIP LOCKED passes over the rows, as it would for a live relay.
    store = SqlOutboxStore(pg_engine)
    deadline = time.monotonic() + 30
    while not store.relay_batch(100, confirm) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sent == ids
    assert rows(pg_engine) == {m: (True, 1, None) for m in ids}
