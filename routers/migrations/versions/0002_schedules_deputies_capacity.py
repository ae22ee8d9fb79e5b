"""schedules, holidays, deputies and capacity (issue 15)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("timezone", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hours", sa.String(length=400), nullable=True))
        batch_op.add_column(sa.Column("holidays", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("after_hours", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("after_hours_dial", sa.String(length=400), nullable=True))
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deputy", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("capacity", sa.String(length=400), nullable=True))
        batch_op.add_column(sa.Column("hours", sa.String(length=400), nullable=True))
    with op.batch_alter_table("agent_presence", schema=None) as batch_op:
        batch_op.add_column(sa.Column("until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("deputy", sa.String(length=200), nullable=True))
    op.create_table(
        "team_holidays",
        sa.Column("team_id", sa.String(length=200), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("hours", sa.String(length=400), nullable=True),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("team_id", "day"),
    )
    op.create_table(
        "assignments",
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=True),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("message_id"),
    )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_assignments_agent_open", ["agent_id", "closed_at", "assigned_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_assignments_customer_id"), ["customer_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assignments_customer_id"))
        batch_op.drop_index("ix_assignments_agent_open")
    op.drop_table("assignments")
    op.drop_table("team_holidays")
    with op.batch_alter_table("agent_presence", schema=None) as batch_op:
        batch_op.drop_column("deputy")
        batch_op.drop_column("until")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("hours")
        batch_op.drop_column("capacity")
        batch_op.drop_column("deputy")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("after_hours_dial")
        batch_op.drop_column("after_hours")
        batch_op.drop_column("holidays")
        batch_op.drop_column("hours")
        batch_op.drop_column("timezone")
