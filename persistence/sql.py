"""Small dialect helpers shared by the repositories."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

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
