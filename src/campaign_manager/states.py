"""The states the database stores, as `StrEnum`s. A member is its value (`JobStatus.DONE == "done"`), so rows,
SQL parameters and `--json` output hold the same plain strings as before; the enums give them one spelling.

A leaf module (no SQLModel), so that the CLI and SQL-writing code can name a state without loading the models.
The columns stay VARCHAR: the migrations' schema does not change, and a value read back is a plain `str`.
"""

from __future__ import annotations

from enum import StrEnum


class RecipientStatus(StrEnum):
    """`recipient.status`. Only `audience.consent` changes it."""

    ACTIVE = "active"
    OPTED_OUT = "opted_out"
    BOUNCED = "bounced"  # a hard bounce (SMTP 5.1.x): never mailed again until `cm recipient update --clear-bounce`
    PENDING = "pending"  # signed up through `cm serve`, not yet confirmed (double opt-in): never mailed a campaign


class JobStatus(StrEnum):
    """`job.status`: queued -> running -> done | failed | cancelled (and back to queued for a retry)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_ENDED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class ConsentAction(StrEnum):
    """`consent_event.action`: what an entry of the append-only consent log records."""

    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    FORGET = "forget"
    BOUNCE = "bounce"
    CLEAR_BOUNCE = "clear_bounce"


class CampaignStatus(StrEnum):
    """`campaign.status`: draft -> scheduled -> sending -> sent, or paused (and resumed), or cancelled. `sent` only
    when no delivery is pending."""

    DRAFT = "draft"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    PAUSED = "paused"
    SENT = "sent"
    CANCELLED = "cancelled"


class DeliveryStatus(StrEnum):
    """`delivery.status`: one row per recipient of a campaign, the ledger of who got it."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
