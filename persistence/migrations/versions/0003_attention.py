"""parking: attention columns on generations, a failure count for the sweeper

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("attention_reason", sa.String(1000), nullable=True))
        batch.add_column(sa.Column("attention_kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("attention_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("fire_failures", sa.Integer, nullable=False,
                                   server_default=sa.text("0")))
    op.create_index("ix_generations_attention", "generations", ["attention_since", "id"],
                    postgresql_where=sa.text("attention_since IS NOT NULL"),
                    sqlite_where=sa.text("attention_since IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_generations_attention", table_name="generations")
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("fire_failures")
        batch.drop_column("attention_since")
        batch.drop_column("attention_kind")
        batch.drop_column("attention_reason")
