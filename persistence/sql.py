"""Small dialect helpers shared by the repositories."""

from __future__ import annotations

import json
from typing import Any

import orjson
from sqlalchemy import Connection, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def json_dumps(value: Any) -> str:
    """JSON for the JSON/JSONB columns: orjson, with the standard library as the fallback.

    orjson is several times faster; for the values it refuses (integers beyond 64 bits,
    which ``json`` writes exactly) the standard library writes what it always wrote.
    """
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


def json_loads(raw: str | bytes) -> Any:
    return orjson.loads(raw)


_INSERT_IGNORE: dict[tuple[str, str], Any] = {}


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on the primary key; True if a row was inserted.

    Unlike catching IntegrityError, this does not abort a PostgreSQL transaction. The
    statement is built once per table and dialect; the values travel as parameters.
    """
    dialect = conn.dialect.name
    stmt = _INSERT_IGNORE.get((dialect, table.name))
    if stmt is None:
        if dialect == "postgresql":
            stmt = pg_insert(table).on_conflict_do_nothing()
        elif dialect == "sqlite":
            stmt = sqlite_insert(table).on_conflict_do_nothing()
        else:  # pragma: no cover - only PostgreSQL and SQLite are supported
            raise RuntimeError(f"unsupported database {dialect}")
        _INSERT_IGNORE[(dialect, table.name)] = stmt
    return bool(conn.execute(stmt, values).rowcount == 1)
