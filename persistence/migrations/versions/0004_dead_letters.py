"""dead letters kept by the service (support can list, replay and discard them)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("message_key", sa.String(255), nullable=False),
        sa.Column("dead_lettered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.Column("exchange", sa.String(128), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("generation_id", sa.String(36), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(16), nullable=True),
        sa.Column("resolved_reason", sa.String(500), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
        sa.UniqueConstraint("message_key", name="uq_dead_letters_message_key"),
    )
    op.create_index("ix_dead_letters_status_dead_lettered_at_id", "dead_letters",
                    ["status", "dead_lettered_at", "id"])
    op.create_index("ix_dead_letters_dead_lettered_at_id", "dead_letters",
                    ["dead_lettered_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_dead_lettered_at_id", table_name="dead_letters")
    op.drop_index("ix_dead_letters_status_dead_lettered_at_id", table_name="dead_letters")
    op.drop_table("dead_letters")
