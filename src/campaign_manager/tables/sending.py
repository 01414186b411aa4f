"""The campaigns' tables: a campaign, the groups it goes to, the recipients it names, and its delivery ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlmodel import Field

from campaign_manager import limits
from campaign_manager.states import CampaignStatus, DeliveryStatus
from campaign_manager.tables.base import TableModel, UtcDateTime, created, fk


class Campaign(TableModel, table=True):
    __tablename__ = "campaign"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(max_length=limits.TITLE, nullable=False)
    subject: str = Field(max_length=limits.SUBJECT, nullable=False)
    body_text: str = Field(nullable=False)
    body_html: str | None = Field(default=None)
    from_address: str | None = Field(default=None, max_length=limits.EMAIL)
    status: str = Field(default=CampaignStatus.DRAFT, max_length=20, nullable=False)
    created_at: datetime = created()
    updated_at: datetime = created()
    # Sending: when it is to start, through which notifier, at what rate (None: the notifier's), why it is paused.
    scheduled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    notifier: str | None = Field(default=None, max_length=100)
    rate: float | None = Field(default=None)
    status_reason: str | None = Field(default=None)
    # The ledger is written in segments of recipient ids: those up to here are in it (resumable); complete once
    # `ledger_done`.
    ledger_through: int = Field(default=0, nullable=False)
    ledger_done: bool = Field(default=False, nullable=False)


class CampaignGroup(TableModel, table=True):
    __tablename__ = "campaign_group"

    campaign_id: int | None = fk("campaign.id", primary_key=True)
    group_id: int | None = fk("recipient_group.id", primary_key=True)


class CampaignRecipient(TableModel, table=True):
    __tablename__ = "campaign_recipient"
    # By recipient too: `forget` and the cascade of a recipient's delete look them up that way.
    __table_args__ = (
        sa.Index("ix_campaign_recipient_recipient_id", "recipient_id"),
        {"sqlite_with_rowid": False},
    )

    campaign_id: int | None = fk("campaign.id", primary_key=True)
    recipient_id: int | None = fk("recipient.id", primary_key=True)


class Delivery(TableModel, table=True):
    """The ledger: one row per recipient of a campaign. It holds ids, never addresses; `forget` deletes the
    recipient and leaves the row, anonymised (recipient_id NULL), so the counts stay true."""

    __tablename__ = "delivery"
    __table_args__ = (
        sa.UniqueConstraint("campaign_id", "recipient_id", name="uq_delivery_campaign_recipient"),
        # The claim: a campaign's pending deliveries in id order.
        sa.Index("ix_delivery_campaign_status", "campaign_id", "status", "id"),
        sa.Index("ix_delivery_recipient_id", "recipient_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    campaign_id: int = fk("campaign.id")
    recipient_id: int | None = fk("recipient.id", ondelete="SET NULL", nullable=True)
    status: str = Field(default=DeliveryStatus.PENDING, max_length=20, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    last_error: str | None = Field(default=None)
    sent_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    provider_id: str | None = Field(default=None, max_length=300)
    # A retry waits until then; a claim holds the row until `claimed_until`, and results are written only where
    # `claim_token` still matches (a run that lost its claim cannot overwrite a newer one).
    next_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    claim_token: str | None = Field(default=None, max_length=40)
    claimed_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # The data went out but no reply came (the connection dropped): it may have been delivered, and is retried.
    uncertain: int = Field(default=0, nullable=False)
    bounced: bool = Field(default=False, nullable=False)
