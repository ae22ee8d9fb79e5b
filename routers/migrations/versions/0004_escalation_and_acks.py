"""escalation and acknowledgements (issue 16): teams' first-response times and escalation
targets, the messages waiting for a first answer, the customers' language and the ledger
of acknowledgements sent

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 04:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("first_response", sa.String(length=400), nullable=True))
        batch_op.add_column(sa.Column("escalate_to", sa.String(length=200), nullable=True))
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("language", sa.String(length=16), nullable=True))
    with op.batch_alter_table("routed", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("attempt", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
    op.create_table(
        "waiting",
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=True),
        sa.Column("team_id", sa.String(length=200), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("level", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    op.create_index(op.f("ix_waiting_customer_id"), "waiting", ["customer_id"])
    op.create_index(op.f("ix_waiting_due_at"), "waiting", ["due_at"])
    op.create_table(
        "acks",
        sa.Column("key", sa.String(length=600), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index(op.f("ix_acks_at"), "acks", ["at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_acks_at"), table_name="acks")
    op.drop_table("acks")
    op.drop_index(op.f("ix_waiting_due_at"), table_name="waiting")
    op.drop_index(op.f("ix_waiting_customer_id"), table_name="waiting")
    op.drop_table("waiting")
    with op.batch_alter_table("routed", schema=None) as batch_op:
        batch_op.drop_column("attempt")
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_column("language")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("escalate_to")
        batch_op.drop_column("first_response")
