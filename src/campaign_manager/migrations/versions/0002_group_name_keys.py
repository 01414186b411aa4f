"""group names matched ignoring case; a table of database-wide facts; recipient indexes for forget

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from campaign_manager.errors import DatabaseError

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cm_meta",
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    # `forget` (and the cascade of a recipient's delete) finds a person's audience links and consent events by
    # recipient id: without these, each scanned the whole table (a second a forget at 1,000,000 rows).
    op.create_index("ix_campaign_recipient_recipient_id", "campaign_recipient", ["recipient_id"])
    op.create_index("ix_consent_event_recipient_id", "consent_event", ["recipient_id"])
    with op.batch_alter_table("recipient_group") as batch_op:
        batch_op.add_column(sa.Column("name_key", sa.String(length=200), nullable=True))
    _fill_name_keys()
    with op.batch_alter_table("recipient_group") as batch_op:
        batch_op.alter_column("name_key", existing_type=sa.String(length=200), nullable=False)
        batch_op.create_unique_constraint("uq_recipient_group_name_key", ["name_key"])


def _fill_name_keys() -> None:
    """The key is computed in Python (str.lower folds all of Unicode; SQLite's lower() only ASCII), as the code
    that creates groups computes it. Two groups whose names differ only in case cannot both keep their names: the
    migration stops, listing them, and changes nothing."""
    conn = op.get_bind()
    groups = conn.execute(sa.text("SELECT id, name FROM recipient_group ORDER BY id")).all()
    by_key: dict[str, list[tuple[int, str]]] = {}
    for group_id, name in groups:
        by_key.setdefault(name.lower(), []).append((group_id, name))
    clashes = [found for found in by_key.values() if len(found) > 1]
    if clashes:
        listed = "; ".join(" and ".join(f"{name!r} (id {group_id})" for group_id, name in found) for found in clashes)
        raise DatabaseError(
            f"cannot upgrade: group names must now differ by more than case, and these do not: {listed}",
            hint="rename all but one of each with the cm that made them (`cm group update ID --name NEW`),"
            " then run `cm db upgrade` again",
        )
    for key, [(group_id, _name)] in by_key.items():
        conn.execute(sa.text("UPDATE recipient_group SET name_key = :key WHERE id = :id"), {"key": key, "id": group_id})


def downgrade() -> None:
    op.drop_index("ix_consent_event_recipient_id", "consent_event")
    op.drop_index("ix_campaign_recipient_recipient_id", "campaign_recipient")
    with op.batch_alter_table("recipient_group") as batch_op:
        batch_op.drop_constraint("uq_recipient_group_name_key", type_="unique")
        batch_op.drop_column("name_key")
    op.drop_table("cm_meta")
