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


class CampaignStatus(StrEnum):
    """`campaign.status`. Sending (a later issue) adds the states after a draft."""

    DRAFT = "draft"
