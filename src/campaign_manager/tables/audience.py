"""The audience's tables: recipients, groups and their members, the consent log and the suppression list."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlmodel import Field

from campaign_manager import limits
from campaign_manager.states import RecipientStatus
from campaign_manager.tables.base import TableModel, UtcDateTime, created, fk


class Recipient(TableModel, table=True):
    __tablename__ = "recipient"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=limits.EMAIL, nullable=False)
    email_key: str = Field(max_length=limits.EMAIL, nullable=False, unique=True)
    name: str | None = Field(default=None, max_length=limits.NAME)
    phone: str | None = Field(default=None, max_length=limits.PHONE)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    status: str = Field(default=RecipientStatus.ACTIVE, max_length=20, nullable=False)
    opt_out_reason: str | None = Field(default=None)
    opted_out_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = created()
    updated_at: datetime = created()


class Group(TableModel, table=True):
    __tablename__ = "recipient_group"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=limits.GROUP_NAME, nullable=False, unique=True)
    # The name as it is matched: ignoring case, as emails are (computed in Python, which folds all of Unicode).
    name_key: str = Field(max_length=limits.GROUP_NAME, nullable=False, unique=True)
    description: str | None = Field(default=None)
    # Offered on `cm serve`'s sign-up form (`cm group update G --public`).
    public: bool = Field(default=False, nullable=False)
    created_at: datetime = created()
    updated_at: datetime = created()


class GroupMember(TableModel, table=True):
    __tablename__ = "group_member"
    # WITHOUT ROWID on SQLite: the primary key is the table, one B-tree less to write per membership.
    __table_args__ = (sa.Index("ix_group_member_recipient_id", "recipient_id"), {"sqlite_with_rowid": False})

    group_id: int | None = fk("recipient_group.id", primary_key=True)
    recipient_id: int | None = fk("recipient.id", primary_key=True)
    added_at: datetime = created()


class ConsentEvent(TableModel, table=True):
    """Append-only log of opt-outs, opt-ins and erasures. `email_hash` survives `cm recipient forget`."""

    __tablename__ = "consent_event"

    id: int | None = Field(default=None, primary_key=True)
    recipient_id: int | None = fk("recipient.id", ondelete="SET NULL", nullable=True, index=True)
    email_hash: str = Field(max_length=64, nullable=False, index=True)
    action: str = Field(max_length=20, nullable=False)
    reason: str | None = Field(default=None)
    source: str = Field(max_length=100, nullable=False)
    # The client's IP address, for the person's own consent given on `cm serve` (a confirmed sign-up, an undo);
    # cleared by `forget`.
    client_ip: str | None = Field(default=None, max_length=45)
    created_at: datetime = created()


class Signup(TableModel, table=True):
    """A sign-up on `cm serve`'s form, waiting for its confirmation (double opt-in). What the form asked for (a
    name, a public group) is applied only when confirmed; unconfirmed ones are deleted after serve.confirm_days.
    The client's address is kept only as a keyed hash (`client_key`), to count sign-ups per client."""

    __tablename__ = "signup"
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    recipient_id: int = fk("recipient.id", ondelete="CASCADE", index=True)
    group_id: int | None = fk("recipient_group.id", ondelete="SET NULL", nullable=True)
    name: str | None = Field(default=None, max_length=limits.NAME)
    client_key: str | None = Field(default=None, max_length=64, index=True)
    created_at: datetime = created()
    confirmed_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class Suppression(TableModel, table=True):
    """A forgotten person: only the hash of their email key is kept, so nothing brings them back."""

    __tablename__ = "suppression"

    email_hash: str = Field(max_length=64, primary_key=True)
    reason: str | None = Field(default=None)
    created_at: datetime = created()
