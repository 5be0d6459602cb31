"""trace context: outbox rows' traceparent, history events' trace id

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both nullable and without defaults: adding them rewrites no rows on PostgreSQL.
    op.add_column("outbox", sa.Column("traceparent", sa.String(55), nullable=True))
    op.add_column("generation_events", sa.Column("trace_id", sa.String(32), nullable=True))


def downgrade() -> None:
    op.drop_column("generation_events", "trace_id")
    op.drop_column("outbox", "traceparent")
