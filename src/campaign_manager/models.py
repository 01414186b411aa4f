"""Every table, gathered (Alembic's metadata, and programs that want them all). cm's own modules import the
table modules of their domain instead (`tables.audience`, `tables.sending`, `tables.jobs`), so that a command loads
only the tables it uses."""

from __future__ import annotations

from campaign_manager.tables.audience import ConsentEvent, Group, GroupMember, Recipient, Suppression
from campaign_manager.tables.base import TableModel, UtcDateTime, utcnow
from campaign_manager.tables.jobs import ImportReject, Job, JobFile, Meta
from campaign_manager.tables.sending import Campaign, CampaignGroup, CampaignRecipient

__all__ = [
    "Campaign",
    "CampaignGroup",
    "CampaignRecipient",
    "ConsentEvent",
    "Group",
    "GroupMember",
    "ImportReject",
    "Job",
    "JobFile",
    "Meta",
    "Recipient",
    "Suppression",
    "TableModel",
    "UtcDateTime",
    "utcnow",
]
