"""Preload N completed generations before a benchmark run (``--preload N``).

The rows are not hand-written: one real generation is driven through the running service
(start → samples → selection → final, answered by the stand-in), and once its outbox has
drained, every row the service wrote for it — generation, history, outbox, inbox,
idempotency keys, holds, journal — is the template. Each table's columns are reflected from
the live database (so this works against the schema of whichever checkout migrated it), and
PostgreSQL copies the template N times in ``INSERT … SELECT … FROM generate_series`` batches,
with no per-row Python:

* every UUID in a template row becomes ``md5(uuid || copy)::uuid`` (so generation ids, hold
  ids, message ids, job ids and the idempotency keys, which embed a UUID, stay unique and
  consistent across the tables of one copy);
* the template user becomes one of ``min(N, 1000)`` preload users, whose accounts are then
  created with the balance and held amounts their journal sums to;
* timestamps are one second apart per copy, the last copy a second older than the
  template, so the rows span a realistic history and serial ids grow with time;
* serial ids come from the tables' sequences;
* what the service's retention would already have trimmed from that history (sent outbox
  rows after a day, answered idempotency keys after two, inbox keys after a week) is deleted
  with the service's own purge, so the measured run starts in the steady state of a service
  that has been trimming all along, not with a backlog of millions of rows to delete.

The copy runs with the service stopped, the tables' constraints and indexes dropped and
rebuilt at the end, in two sessions at once: 100k generations (3.8M rows) took ~1 min on the
shared 2-core machine, a million ~6-12 min. The tables are vacuumed and analysed afterwards so
the measured run sees settled statistics, and a CHECKPOINT writes the copy's pages out before
the measured run starts.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import JSON, DateTime, Integer, MetaData, String, Text, create_engine, text
from sqlalchemy.engine import Connection

from persistence.db import normalize_url
from persistence.housekeeping import purge

TEMPLATE_USER = "pre-tpl"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SKIP = {"accounts", "alembic_version"}


def _wait_state(http: httpx.Client, gid: str, want: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = http.get(f"/api/v1/generations/{gid}").raise_for_status().json()
        if body.get("state") == want:
            return body
        time.sleep(0.05)
    raise RuntimeError(f"template generation {gid} never reached {want}")


def template_generation(http: httpx.Client, db_url: str) -> str:
    """Drive one real generation to completion and its outbox to empty; returns its id."""
    http.post(f"/api/v1/accounts/{TEMPLATE_USER}/grants",
              json={"amount": "100000.00", "reason": "bench preload"}).raise_for_status()
    r = http.post("/api/v1/generations", headers={"Idempotency-Key": f"pre-{uuid.uuid4()}"},
                  json={"user_id": TEMPLATE_USER, "prompt": "preloaded banner",
                        "format": "instagram_post", "sample_count": 4})
    r.raise_for_status()
    gid: str = r.json()["id"]
    _wait_state(http, gid, "awaiting_selection")
    http.post(f"/api/v1/generations/{gid}/selection",
              headers={"Idempotency-Key": f"pre-select-{uuid.uuid4()}"},
              json={"sample_id": "s1", "resolution": "high"}).raise_for_status()
    _wait_state(http, gid, "completed")
    engine = create_engine(normalize_url(db_url))
    try:
        with engine.connect() as conn:
            _wait_outbox_drained(conn)
    finally:
        engine.dispose()
    return gid


def _wait_outbox_drained(conn: Connection, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not conn.execute(text("SELECT count(*) FROM outbox WHERE sent_at IS NULL")).scalar():
            return
        time.sleep(0.1)
    raise RuntimeError("the template generation's outbox did not drain")


def _text_expr(col: str, present: list[str], has_user: bool) -> str:
    expr = col
    for u in present:
        expr = f"replace({expr}, '{u}', md5('{u}' || g::text)::uuid::text)"
    if has_user:
        expr = f"replace({expr}, '{TEMPLATE_USER}', 'pre-' || (g % :users)::text)"
    return expr


def _detach_indexes(conn: Connection, tables: list[str]) -> list[str]:
    """Drop the tables' constraints and indexes; returns the DDL that recreates them.

    Maintaining a dozen B-trees row by row (random UUID keys) is most of a naive bulk load;
    building each index once at the end is several times faster.
    """
    restore: list[str] = []
    for name in tables:
        for con, ddl in conn.execute(text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u')"),
                {"t": name}):
            restore.append(f'ALTER TABLE "{name}" ADD CONSTRAINT "{con}" {ddl}')
            conn.execute(text(f'ALTER TABLE "{name}" DROP CONSTRAINT "{con}"'))
        for idx, ddl in conn.execute(text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
                " AND tablename = :t"), {"t": name}):
            restore.append(ddl)
            conn.execute(text(f'DROP INDEX "{idx}"'))
    return restore


def repr_col(c: Any) -> str:
    return f'"{c.name}"'


def _column_expr(c: Any, value: Any) -> str:
    name = f'"{c.name}"'
    if value is None:
        return name
    raw = value if isinstance(value, str) else json.dumps(value)
    uuids, user = sorted(set(UUID_RE.findall(raw))), TEMPLATE_USER in raw
    if isinstance(c.type, DateTime):
        # Copy g is (n + 1 - g) seconds older than the template: the later copy, the newer,
        # so serial ids grow with time as the service's do (the outbox trim walks them).
        return f"{name} - (CAST(:n AS int) + 1 - g) * interval '1 second'"
    if isinstance(c.type, String | Text):
        return _text_expr(name, uuids, user)
    if isinstance(c.type, JSON) or c.type.__class__.__name__ == "JSONB":
        return f"({_text_expr(name + '::text', uuids, user)})::jsonb"
    return name


def bulk_copy(db_url: str, n: int, batch: int = 50_000, workers: int = 2,
              log: Any = print) -> dict[str, int]:
    """Copy the template generation ``n`` times (the service must not be running)."""
    started = time.perf_counter()
    cleanup: list[str] = []
    engine = create_engine(normalize_url(db_url))
    users = max(1, min(n, 1000))
    inserted: dict[str, int] = defaultdict(int)
    try:
        with engine.connect() as conn:
            meta = MetaData()
            meta.reflect(conn)
            plans: list[tuple[str, str, int]] = []
            for table in meta.sorted_tables:
                if table.name in SKIP:
                    continue
                copy = f"_bench_tpl_{table.name}"
                conn.execute(text(f'CREATE TABLE "{copy}" AS SELECT row_number() OVER () AS '
                                  f'tpl_rn, * FROM "{table.name}"'))
                cleanup.append(copy)
                rows = [json.loads(r[0]) for r in conn.execute(
                    text(f'SELECT row_to_json(t)::text FROM "{copy}" t'))]
                if not rows:
                    continue
                cols = [c for c in table.columns
                        if not (c.primary_key and isinstance(c.type, Integer)
                                and c.server_default)]  # serial: the sequence numbers copies
                selects = []
                for row in rows:
                    # Only the UUIDs this row's value holds: a replace() per UUID per row.
                    exprs = [_column_expr(c, row[c.name]) for c in cols]
                    selects.append(f'SELECT {", ".join(exprs)} FROM "{copy}" CROSS JOIN '
                                   f"generate_series(CAST(:lo AS int), CAST(:hi AS int)) g "
                                   f"WHERE tpl_rn = {row['tpl_rn']}")
                sql = (f'INSERT INTO "{table.name}" ({", ".join(repr_col(c) for c in cols)}) '
                       + " UNION ALL ".join(selects))
                plans.append((table.name, sql, len(rows)))
            conn.commit()
            log("preload template: " + ", ".join(f"{t} {k} rows" for t, _, k in plans))
            restore = _detach_indexes(conn, [name for name, _, _ in plans])
            conn.commit()

            def load(part: int) -> None:
                # Two sessions: PostgreSQL runs each INSERT … SELECT on one core.
                with engine.connect() as worker:
                    worker.execute(text("SET synchronous_commit = off"))
                    for lo in range(1 + part * batch, n + 1, batch * workers):
                        hi = min(n, lo + batch - 1)
                        for _name, sql, _k in plans:
                            worker.execute(text(sql), {"lo": lo, "hi": hi, "users": users,
                                                    "n": n})
                        worker.commit()
                        with lock:
                            done[0] += hi - lo + 1
                            rate = done[0] / (time.perf_counter() - started)
                        log(f"preload: {done[0]}/{n} generations ({rate:.0f}/s)")

            lock = threading.Lock()
            done = [0]
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(load, range(workers)))
            for name, _sql, k in plans:
                inserted[name] += k * n
            tpl = conn.execute(text("SELECT * FROM accounts WHERE user_id = :u"),
                               {"u": TEMPLATE_USER}).mappings().one()
            acols = list(tpl.keys())
            select = ", ".join("'pre-' || u::text" if c == "user_id" else f'"{c}"'
                               for c in acols)
            conn.execute(text(f'INSERT INTO accounts ({", ".join(acols)}) SELECT {select} '
                              f"FROM accounts, generate_series(0, :users - 1) u "
                              f"WHERE user_id = :tpl"), {"users": users, "tpl": TEMPLATE_USER})
            conn.execute(text(
                "UPDATE accounts a SET balance_cents = j.b, held_cents = j.h FROM ("
                " SELECT user_id, sum(balance_delta_cents) AS b, sum(held_delta_cents) AS h"
                " FROM journal WHERE user_id LIKE 'pre-%' AND user_id <> :tpl"
                " GROUP BY user_id) j WHERE a.user_id = j.user_id"), {"tpl": TEMPLATE_USER})
            inserted["accounts"] += users
            conn.commit()
            log(f"preload: rows in after {time.perf_counter() - started:.0f} s; "
                f"rebuilding {len(restore)} indexes")
            conn.execute(text("SET maintenance_work_mem = '256MB'"))
            for ddl in restore:
                conn.execute(text(ddl))
            for copy in cleanup:
                conn.execute(text(f'DROP TABLE "{copy}"'))
            conn.commit()
        # A service running through that history would have trimmed as it went: what its
        # retention no longer keeps (sent outbox rows, answered keys, old inbox keys) goes
        # now, by the service's own rules, instead of during the measured run.
        trimmed = purge(engine, datetime.now(UTC), batch=100_000)
        log(f"preload: trimmed past retention {trimmed}")
        for name, k in trimmed.items():
            inserted[name] -= k
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            # Write the preload's dirty pages out now: otherwise the checkpointer writes
            # gigabytes of them during the measured run (seen: 24 gen/s instead of 70, the
            # backends waiting on the disk), which no steady-state service has to do.
            conn.execute(text("CHECKPOINT"))
    finally:
        engine.dispose()
    log(f"preload: {n} generations, {sum(inserted.values())} rows in "
        f"{time.perf_counter() - started:.0f} s")
    return dict(inserted)
