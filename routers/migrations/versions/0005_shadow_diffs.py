"""topic rules in the shadows (issue 20): the messages a candidate rule set would have
routed elsewhere

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shadow_diffs",
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("live", sa.String(length=210), nullable=False),
        sa.Column("live_reason", sa.String(length=64), nullable=False),
        sa.Column("shadow", sa.String(length=210), nullable=False),
        sa.Column("shadow_reason", sa.String(length=64), nullable=False),
        sa.Column("rule", sa.String(length=100), nullable=True),
        sa.PrimaryKeyConstraint("message_id"),
    )
    op.create_index(op.f("ix_shadow_diffs_at"), "shadow_diffs", ["at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_shadow_diffs_at"), table_name="shadow_diffs")
    op.drop_table("shadow_diffs")
