"""billing commits sent: a durable marker that a hold's commit went to external billing

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_commits_sent",
        sa.Column("hold_id", sa.String(36), nullable=False),
        sa.Column("generation_id", sa.String(36), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("hold_id", name="pk_billing_commits_sent"),
    )


def downgrade() -> None:
    op.drop_table("billing_commits_sent")
