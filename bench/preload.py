"""Preload N completed generations before a benchmark run.

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
* timestamps move one second back per copy, so the rows span a realistic history;
* serial ids come from the tables' sequences.

A million generations (about 30 million rows) takes minutes, not hours; the tables are
vacuumed and analysed afterwards so the measured run sees settled statistics.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import defaultdict
from typing import Any

import httpx
from sqlalchemy import JSON, DateTime, Integer, MetaData, String, Text, create_engine, text
from sqlalchemy.engine import Connection

from persistence.db import normalize_url

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


def template_generation(http: httpx.Client) -> str:
    """Drive one real generation to completion; returns its id."""
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


def preload(db_url: str, base: str, headers: dict[str, str], n: int,
            batch: int = 50_000, log: Any = print) -> dict[str, int]:
    """Insert ``n`` completed generations; returns rows inserted per table."""
    started = time.perf_counter()
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        template_generation(http)
    engine = create_engine(normalize_url(db_url))
    users = max(1, min(n, 1000))
    inserted: dict[str, int] = defaultdict(int)
    try:
        with engine.connect() as conn:
            _wait_outbox_drained(conn)
            conn.commit()
            meta = MetaData()
            meta.reflect(conn)
            plans: list[tuple[str, str, int]] = []
            for table in meta.sorted_tables:
                if table.name in SKIP:
                    continue
                rows = [json.loads(r[0]) for r in conn.execute(
                    text(f'SELECT row_to_json(t)::text FROM "{table.name}" t'))]
                if not rows:
                    continue
                cols, exprs = [], []
                for c in table.columns:
                    if c.primary_key and isinstance(c.type, Integer) and c.server_default:
                        continue  # serial: the sequence numbers the copies
                    name = f'"{c.name}"'
                    joined = "\n".join(v if isinstance(v, str) else json.dumps(v)
                                        for v in (r[c.name] for r in rows) if v is not None)
                    if isinstance(c.type, DateTime):
                        expr = f"{name} - g * interval '1 second'"
                    elif isinstance(c.type, String | Text):
                        expr = _text_expr(name, sorted(set(UUID_RE.findall(joined))),
                                          TEMPLATE_USER in joined)
                    elif isinstance(c.type, JSON) or c.type.__class__.__name__ == "JSONB":
                        expr = f"({_text_expr(name + '::text', sorted(set(UUID_RE.findall(joined))), TEMPLATE_USER in joined)})::jsonb"  # noqa: E501
                    else:
                        expr = name
                    cols.append(name)
                    exprs.append(expr)
                conn.execute(text(f'CREATE TEMP TABLE "tpl_{table.name}" AS '
                                  f'SELECT * FROM "{table.name}"'))
                sql = (f'INSERT INTO "{table.name}" ({", ".join(cols)}) '
                       f'SELECT {", ".join(exprs)} FROM "tpl_{table.name}" '
                       f"CROSS JOIN generate_series(CAST(:lo AS int), CAST(:hi AS int)) g")
                plans.append((table.name, sql, len(rows)))
            log("preload template: " + ", ".join(f"{t} {k} rows" for t, _, k in plans))
            conn.execute(text("SET synchronous_commit = off"))
            for lo in range(1, n + 1, batch):
                hi = min(n, lo + batch - 1)
                for name, sql, k in plans:
                    conn.execute(text(sql), {"lo": lo, "hi": hi, "users": users})
                    inserted[name] += k * (hi - lo + 1)
                conn.commit()
                rate = hi / (time.perf_counter() - started)
                log(f"preload: {hi}/{n} generations ({rate:.0f}/s)")
            tpl = conn.execute(text("SELECT * FROM accounts WHERE user_id = :u"),
                               {"u": TEMPLATE_USER}).mappings().one()
            cols = list(tpl.keys())
            select = ", ".join("'pre-' || u::text" if c == "user_id" else f'"{c}"'
                               for c in cols)
            conn.execute(text(f'INSERT INTO accounts ({", ".join(cols)}) SELECT {select} '
                              f"FROM accounts, generate_series(0, :users - 1) u "
                              f"WHERE user_id = :tpl"), {"users": users, "tpl": TEMPLATE_USER})
            conn.execute(text(
                "UPDATE accounts a SET balance_cents = j.b, held_cents = j.h FROM ("
                " SELECT user_id, sum(balance_delta_cents) AS b, sum(held_delta_cents) AS h"
                " FROM journal WHERE user_id LIKE 'pre-%' AND user_id <> :tpl"
                " GROUP BY user_id) j WHERE a.user_id = j.user_id"), {"tpl": TEMPLATE_USER})
            inserted["accounts"] += users
            conn.commit()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
    log(f"preload: {n} generations, {sum(inserted.values())} rows in "
        f"{time.perf_counter() - started:.0f} s")
    return dict(inserted)
