"""sending: the delivery ledger, the campaign's sending state, the database's identity and signing secret

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 04:00:00
"""

import secrets
import sys
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("campaign") as batch_op:
        batch_op.add_column(sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("notifier", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("rate", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("status_reason", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("ledger_through", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("ledger_done", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("campaign") as batch_op:
        batch_op.alter_column("ledger_through", server_default=None)
        batch_op.alter_column("ledger_done", server_default=None)
    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("recipient_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_id", sa.String(length=300), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(length=40), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("uncertain", sa.Integer(), nullable=False),
        sa.Column("bounced", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["recipient_id"], ["recipient.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign_id", "recipient_id", name="uq_delivery_campaign_recipient"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_delivery_campaign_status", "delivery", ["campaign_id", "status", "id"])
    op.create_index("ix_delivery_recipient_id", "delivery", ["recipient_id"])
    # The database's identity (in every message's idempotency key) and the secret that signs unsubscribe links
    # when `unsubscribe.secret` is not set.
    meta = sa.table("cm_meta", sa.column("key", sa.String()), sa.column("value", sa.String()))
    op.bulk_insert(
        meta,
        [
            {"key": "database_id", "value": secrets.token_hex(6)},
            {"key": "signing_secret", "value": secrets.token_hex(32)},
        ],
    )
    _list_templated_drafts()


def _list_templated_drafts() -> None:
    """Subjects and bodies are Jinja2 templates from now on: a draft written before that holds `{{` or `{%` is
    compiled here, and any that does not compile is listed (it is refused at `cm campaign send` until fixed)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment()
    rows = op.get_bind().execute(sa.text("SELECT id, subject, body_text, body_html FROM campaign ORDER BY id"))
    for campaign_id, *parts in rows:
        for name, text in zip(("subject", "text", "html"), parts, strict=True):
            if text and ("{{" in text or "{%" in text):
                try:
                    env.parse(text)
                except TemplateSyntaxError as exc:
                    print(
                        f"note: campaign {campaign_id}'s {name} is now a template and does not compile (line"
                        f" {exc.lineno}: {exc.message}); fix it with `cm campaign update {campaign_id}`",
                        file=sys.stderr,
                    )


def downgrade() -> None:
    op.execute("DELETE FROM cm_meta WHERE key IN ('database_id', 'signing_secret')")
    op.drop_index("ix_delivery_recipient_id", table_name="delivery")
    op.drop_index("ix_delivery_campaign_status", table_name="delivery")
    op.drop_table("delivery")
    with op.batch_alter_table("campaign") as batch_op:
        for column in (
            "ledger_done",
            "ledger_through",
            "status_reason",
            "rate",
            "notifier",
            "finished_at",
            "started_at",
            "scheduled_at",
        ):
            batch_op.drop_column(column)
