"""The Alembic migrations build exactly the schema ``persistence/tables.py`` declares.

Run on PostgreSQL (the production dialect): after ``upgrade head`` autogenerate's
``compare_metadata`` must find nothing to change — a column, index or constraint added to
tables.py without a migration (or the other way round) fails here.
"""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData

from persistence.tables import metadata

pytestmark = pytest.mark.integration


def test_migrations_match_the_declared_tables(pg_engine: Engine) -> None:
    with pg_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": False})
        diff = compare_metadata(context, metadata)
    assert diff == [], diff


def test_the_comparison_would_notice_a_column_missing_from_the_migrations(
        pg_engine: Engine) -> None:
    declared = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(declared)
    declared.tables["generations"].append_column(Column("not_migrated", Integer))
    with pg_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), declared)
    assert [(d[0], d[3].name) for d in diff] == [("add_column", "not_migrated")]
