"""The background jobs' tables: a job, its staged upload, an import's rejected rows, and cm's own small facts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlmodel import Field

from campaign_manager.states import JobStatus
from campaign_manager.tables.base import TableModel, UtcDateTime, created, fk


class Job(TableModel, table=True):
    """A queued operation. The queue only carries the id; this row is what happened, whatever the backend."""

    __tablename__ = "job"
    # Ids are never reused, even after a delete or `forget`.
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_autoincrement": True}

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
    created_at: datetime = created()
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class JobFile(TableModel, table=True):
    """The input a job needs (an uploaded CSV), staged in chunks so the worker never needs the original file."""

    __tablename__ = "job_file"

    job_id: int | None = fk("job.id", primary_key=True)
    seq: int = Field(primary_key=True)
    data: bytes = Field(sa_type=sa.LargeBinary, nullable=False)


class ImportReject(TableModel, table=True):
    """A row an import could not take, kept so the user can fix and re-import it."""

    __tablename__ = "import_reject"
    __table_args__ = (sa.Index("ix_import_reject_job_id_line", "job_id", "line"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int | None = fk("job.id")
    line: int = Field(nullable=False)
    raw: str = Field(nullable=False)
    reason: str = Field(nullable=False)


class Meta(TableModel, table=True):
    """Small facts about the database as a whole (when staged uploads were last purged, say)."""

    __tablename__ = "cm_meta"

    key: str = Field(max_length=100, primary_key=True)
    value: str = Field(nullable=False)
