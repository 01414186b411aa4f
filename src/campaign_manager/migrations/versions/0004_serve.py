"""serve: sign-ups waiting for confirmation (double opt-in), public groups, the client IP of consent given on the web

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 07:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("recipient_group") as batch_op:
        batch_op.add_column(sa.Column("public", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("recipient_group") as batch_op:
        batch_op.alter_column("public", server_default=None)
    with op.batch_alter_table("consent_event") as batch_op:
        batch_op.add_column(sa.Column("client_ip", sa.String(length=45), nullable=True))
    op.create_table(
        "signup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recipient_id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("client_key", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["recipient_id"], ["recipient.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["group_id"], ["recipient_group.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_signup_recipient_id", "signup", ["recipient_id"])
    op.create_index("ix_signup_client_key", "signup", ["client_key"])


def downgrade() -> None:
    op.drop_index("ix_signup_client_key", table_name="signup")
    op.drop_index("ix_signup_recipient_id", table_name="signup")
    op.drop_table("signup")
    with op.batch_alter_table("consent_event") as batch_op:
        batch_op.drop_column("client_ip")
    with op.batch_alter_table("recipient_group") as batch_op:
        batch_op.drop_column("public")
