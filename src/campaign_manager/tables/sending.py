"""The campaigns' tables: a campaign, the groups it goes to and the recipients it names."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlmodel import Field

from campaign_manager import limits
from campaign_manager.states import CampaignStatus
from campaign_manager.tables.base import TableModel, created, fk


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
