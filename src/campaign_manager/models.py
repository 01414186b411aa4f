"""SQLModel tables. Ids are integers that never change or get reused; natural keys (email, group name) are unique.

Times are stored in UTC. Emails are stored as email-validator normalizes them, and compared through
`email_key` (the normalized address lowercased), so two spellings that differ only in case are one recipient.
The states a status column holds are the enums of `states` (the columns are plain strings).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from campaign_manager import limits
from campaign_manager.states import CampaignStatus, JobStatus, RecipientStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite would hand back naive ones)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UtcDateTime, nullable=False)


def _fk(
    target: str, *, ondelete: str = "CASCADE", primary_key: bool = False, nullable: bool = False, index: bool = False
) -> Any:
    return Field(  # type: ignore[call-overload]  # sqlmodel types ondelete as a Literal
        default=None, foreign_key=target, ondelete=ondelete, primary_key=primary_key, nullable=nullable, index=index
    )


class Recipient(SQLModel, table=True):
    __tablename__ = "recipient"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=limits.EMAIL, nullable=False)
    email_key: str = Field(max_length=limits.EMAIL, nullable=False, unique=True)
    name: str | None = Field(default=None, max_length=limits.NAME)
    phone: str | None = Field(default=None, max_length=limits.PHONE)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    status: str = Field(default=RecipientStatus.ACTIVE, max_length=20, nullable=False)
    opt_out_reason: str | None = Field(default=None)
    opted_out_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class Group(SQLModel, table=True):
    __tablename__ = "recipient_group"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=limits.GROUP_NAME, nullable=False, unique=True)
    # The name as it is matched: ignoring case, as emails are (computed in Python, which folds all of Unicode).
    name_key: str = Field(max_length=limits.GROUP_NAME, nullable=False, unique=True)
    description: str | None = Field(default=None)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class GroupMember(SQLModel, table=True):
    __tablename__ = "group_member"
    # WITHOUT ROWID on SQLite: the primary key is the table, one B-tree less to write per membership.
    __table_args__ = (sa.Index("ix_group_member_recipient_id", "recipient_id"), {"sqlite_with_rowid": False})

    group_id: int | None = _fk("recipient_group.id", primary_key=True)
    recipient_id: int | None = _fk("recipient.id", primary_key=True)
    added_at: datetime = _created()


class Campaign(SQLModel, table=True):
    __tablename__ = "campaign"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(max_length=limits.TITLE, nullable=False)
    subject: str = Field(max_length=limits.SUBJECT, nullable=False)
    body_text: str = Field(nullable=False)
    body_html: str | None = Field(default=None)
    from_address: str | None = Field(default=None, max_length=limits.EMAIL)
    status: str = Field(default=CampaignStatus.DRAFT, max_length=20, nullable=False)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class CampaignGroup(SQLModel, table=True):
    __tablename__ = "campaign_group"

    campaign_id: int | None = _fk("campaign.id", primary_key=True)
    group_id: int | None = _fk("recipient_group.id", primary_key=True)


class CampaignRecipient(SQLModel, table=True):
    __tablename__ = "campaign_recipient"
    # By recipient too: `forget` and the cascade of a recipient's delete look them up that way.
    __table_args__ = (
        sa.Index("ix_campaign_recipient_recipient_id", "recipient_id"),
        {"sqlite_with_rowid": False},
    )

    campaign_id: int | None = _fk("campaign.id", primary_key=True)
    recipient_id: int | None = _fk("recipient.id", primary_key=True)


class ConsentEvent(SQLModel, table=True):
    """Append-only log of opt-outs, opt-ins and erasures. `email_hash` survives `cm recipient forget`."""

    __tablename__ = "consent_event"

    id: int | None = Field(default=None, primary_key=True)
    recipient_id: int | None = _fk("recipient.id", ondelete="SET NULL", nullable=True, index=True)
    email_hash: str = Field(max_length=64, nullable=False, index=True)
    action: str = Field(max_length=20, nullable=False)
    reason: str | None = Field(default=None)
    source: str = Field(max_length=100, nullable=False)
    created_at: datetime = _created()


class Suppression(SQLModel, table=True):
    """A forgotten person: only the hash of their email key is kept, so nothing brings them back."""

    __tablename__ = "suppression"

    email_hash: str = Field(max_length=64, primary_key=True)
    reason: str | None = Field(default=None)
    created_at: datetime = _created()


class Job(SQLModel, table=True):
    """A queued operation. The queue only carries the id; this row is what happened, whatever the backend."""

    __tablename__ = "job"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=50, nullable=False)
    status: str = Field(default=JobStatus.QUEUED, max_length=20, nullable=False, index=True)
    args: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    counts: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    result: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    error: str | None = Field(default=None)
    attempts: int = Field(default=0, nullable=False)
    worker: str | None = Field(default=None, max_length=200)
    lease_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = _created()
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class JobFile(SQLModel, table=True):
    """The input a job needs (an uploaded CSV), staged in chunks so the worker never needs the original file."""

    __tablename__ = "job_file"

    job_id: int | None = _fk("job.id", primary_key=True)
    seq: int = Field(primary_key=True)
    data: bytes = Field(sa_type=sa.LargeBinary, nullable=False)


class ImportReject(SQLModel, table=True):
    """A row an import could not take, kept so the user can fix and re-import it."""

    __tablename__ = "import_reject"
    __table_args__ = (sa.Index("ix_import_reject_job_id_line", "job_id", "line"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int | None = _fk("job.id")
    line: int = Field(nullable=False)
    raw: str = Field(nullable=False)
    reason: str = Field(nullable=False)


class Meta(SQLModel, table=True):
    """Small facts about the database as a whole (when staged uploads were last purged, say)."""

    __tablename__ = "cm_meta"

    key: str = Field(max_length=100, primary_key=True)
    value: str = Field(nullable=False)
