"""Trimming in bounded steps (persistence/housekeeping.py, the sweeper's housekeeping).

A backlog of rows past their retention (a first start on a large database, a service that
was down for days) used to go in one DELETE per table in one transaction: millions of rows
while requests and the deadline sweeper waited. Now each step deletes at most a batch per
table, walking an index from where the previous step stopped.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, insert, select
from sqlalchemy.pool import StaticPool

from aigen.jobs.sweeper import Sweeper
from persistence.housekeeping import Purge, purge
from persistence.tables import idempotency_keys, inbox, outbox

NOW = datetime(2026, 11, 20, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: Any) -> Engine:
    return request.getfixturevalue("sqlite_engine" if request.param == "sqlite"
                                   else "pg_engine")


def _fill(engine: Engine, old: int, recent: int, now: datetime = NOW) -> None:
    """``old`` rows of each kind past retention, ``recent`` within it, and old unsent
    outbox rows (never deleted, however old) between them."""
    rows: list[tuple[str, datetime]] = (
        [(f"o{n}", now - timedelta(days=8, seconds=n)) for n in range(old)]
        + [(f"r{n}", now - timedelta(hours=1, seconds=n)) for n in range(recent)])
    with engine.begin() as conn:
        conn.execute(insert(idempotency_keys), [
            {"scope": "s", "key": k, "request_hash": "h", "status": 202, "body": {},
             "created_at": at} for k, at in rows])
        conn.execute(insert(inbox), [
            {"job_id": k, "event_type": "e", "generation_id": "g", "received_at": at}
            for k, at in rows])
        for n, (k, at) in enumerate(sorted(rows, key=lambda r: r[1])):  # ids grow with time
            conn.execute(insert(outbox).values(
                exchange="x", routing_key="r", message_id=k, correlation_id="c", type="t",
                body="{}", created_at=at, sent_at=None if n % 7 == 3 else at, attempts=0))


def _count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_round_deletes_exactly_what_outlived_its_retention(engine: Engine) -> None:
    _fill(engine, old=23, recent=5)
    unsent_old = sum(1 for n in range(28) if n % 7 == 3 and n < 23)
    assert purge(engine, NOW, batch=4) == {
        "idempotency_keys": 23, "outbox": 23 - unsent_old, "inbox": 23}
    with engine.connect() as conn:
        assert sorted(conn.execute(select(idempotency_keys.c.key)).scalars()) == \
            sorted(f"r{n}" for n in range(5))
        assert sorted(conn.execute(select(inbox.c.job_id)).scalars()) == \
            sorted(f"r{n}" for n in range(5))
        kept = conn.execute(select(outbox.c.message_id, outbox.c.sent_at)).all()
    assert len(kept) == 5 + unsent_old
    assert all(sent is None for key, sent in kept if key.startswith("o"))
    assert purge(engine, NOW, batch=4) == {"idempotency_keys": 0, "outbox": 0, "inbox": 0}


def test_each_step_deletes_at_most_a_batch_per_table(engine: Engine) -> None:
    _fill(engine, old=10, recent=3)
    rnd = Purge(NOW, batch=4)
    steps = []
    while not rnd.finished:
        steps.append(rnd.step(engine))
        assert all(n <= 4 for n in steps[-1].values()), steps
    assert len(steps) >= 3  # 10 rows at 4 a step
    assert _count(engine, idempotency_keys) == 3
    assert _count(engine, inbox) == 3


def test_a_step_reads_a_bounded_part_of_a_large_table(pg_engine: Engine) -> None:
    """On PostgreSQL, a step's statements touch about a batch of rows, not the table: the
    walk is an index range from the cursor (tuples read, from the backend's own counters,
    so the step runs on one connection)."""
    _fill(pg_engine, old=3000, recent=3000)
    one = create_engine(pg_engine.url, poolclass=StaticPool)
    try:
        with one.connect() as conn:
            conn.exec_driver_sql("ANALYZE")  # as autovacuum would have: the planner's view
            conn.commit()
        rnd = Purge(NOW, batch=100)
        rnd.step(one)  # the first step of each table
        before = _tuples_read(one)
        statements: list[str] = []

        def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        event.listen(one, "before_cursor_execute", seen)
        unsent = sum(1 for n in range(100, 200) if n % 7 == 3)  # the second hundred by id
        assert rnd.step(one) == {"idempotency_keys": 100, "outbox": 100 - unsent,
                                 "inbox": 100}
        event.remove(one, "before_cursor_execute", seen)
        after = _tuples_read(one)
    finally:
        one.dispose()
    assert len(statements) == 6  # a window and a delete per table
    read = {t: after[t] - before[t] for t in after}
    assert all(0 < n <= 3 * 100 for n in read.values()), read  # of 6000 rows each


def _tuples_read(engine: Engine) -> dict[str, int]:
    """This backend's counters so far: flushed once the backend is idle, read afresh."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
        conn.commit()
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        return dict(conn.exec_driver_sql(
            "SELECT relname, coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0) FROM "
            "pg_stat_user_tables WHERE relname IN ('idempotency_keys', 'inbox', 'outbox')"
        ).all())


def test_the_sweeper_trims_a_backlog_a_step_per_sweep(sqlite_engine: Engine) -> None:
    """Housekeeping between deadline firings: one bounded step per sweep until the round is
    done, then nothing until the next round is due."""
    _fill(sqlite_engine, old=9, recent=2, now=datetime.now(UTC))  # the sweeper's clock

    class Bus:
        ctx = type("Ctx", (), {"retry": None})()

        def handle(self, command: Any) -> int:
            return 0

    sweeper = Sweeper(Bus(), sqlite_engine, interval=1,  # type: ignore[arg-type]
                      purge_batch=4)
    remaining = []
    for _ in range(5):
        sweeper._housekeeping()
        remaining.append(_count(sqlite_engine, inbox))
    assert remaining[:3] == [7, 3, 2]  # 4 a sweep, then the round is over
    assert remaining[3:] == [2, 2]  # the next round is an hour away
    assert sweeper._purge is None


def test_the_outbox_walk_goes_on_through_windows_that_mix_old_and_kept_rows(
        engine: Engine) -> None:
    """Ids grow with time only roughly (transactions commit out of order; a bulk load
    interleaves): a window holding some rows that are kept does not end the walk, only a
    window that is all newer than the cut does."""
    with engine.begin() as conn:
        for n in range(40):
            at = NOW - (timedelta(days=3) if n % 2 == 0 else timedelta(hours=1))
            conn.execute(insert(outbox).values(
                exchange="x", routing_key="r", message_id=f"m{n}", correlation_id="c",
                type="t", body="{}", created_at=at, sent_at=at, attempts=0))
    assert purge(engine, NOW, batch=4)["outbox"] == 20
    assert _count(engine, outbox) == 20


def test_the_outbox_walk_stops_at_the_first_window_newer_than_the_cut(
        engine: Engine) -> None:
    _fill(engine, old=6, recent=30)
    rnd = Purge(NOW, batch=4)
    outbox_steps = 0
    while not rnd.finished:
        outbox_steps += "outbox" in rnd.step(engine)
    assert rnd.deleted["outbox"] == 6 - 1  # one old row unsent
    # Windows of 4 by id: old rows, old and recent, then all recent: that ends the walk, and
    # the rest of the 30 recent rows are not read window after window.
    assert outbox_steps == 3
