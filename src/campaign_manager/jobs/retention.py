"""How long cm keeps staged uploads. An uploaded CSV is personal data: a job that has finished (done, failed or
cancelled) keeps its staged copy for `jobs.keep_files_days`, so that a failed or interrupted import can be retried,
and then it is purged. Workers and drains purge at most once an hour (one of them, whichever comes first:
the time is kept in the database); `cm jobs purge` does it at once. The same hourly round deletes the sign-ups of
`cm serve`'s form older than `serve.confirm_days`, and the pending recipients nobody confirmed (`signups`)."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from campaign_manager.audience import signups
from campaign_manager.db import open_session
from campaign_manager.states import JOB_ENDED
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import Job, JobFile, Meta

PURGE_EVERY = timedelta(hours=1)
SIGNUP_BATCH = 1_000  # sign-ups deleted a transaction
_LAST_PURGE = "last_purge"


def purge_files(session: Session, *, older_than_days: float) -> list[int]:
    """Delete the staged uploads of jobs that ended more than
    `older_than_days` ago. Returns the ids of the jobs purged; each remembers when (`result.file_purged`)."""
    now = utcnow()
    cutoff = now - timedelta(days=older_than_days)
    has_file = sa.exists().where(col(JobFile.job_id) == Job.id)
    jobs = session.exec(
        select(Job)
        .where(
            col(Job.status).in_(JOB_ENDED),
            col(Job.finished_at) < cutoff,
            has_file,
        )
        .order_by(col(Job.id))
    ).all()
    for job in jobs:
        session.exec(sa.delete(JobFile).where(col(JobFile.job_id) == job.id))
        job.result = {**(job.result or {}), "file_purged": now.isoformat()}
    session.flush()
    return [job.id for job in jobs if job.id is not None]


def purge_if_due(
    url: str, *, older_than_days: float, signup_days: float | None = None, now: datetime | None = None
) -> list[int] | None:
    """purge_files (and with `signup_days`, purge_signups), unless some process did it less than PURGE_EVERY ago
    (then None)."""
    now = now or utcnow()
    with open_session(url, write=False) as session:  # the usual answer, without taking SQLite's write lock
        if _recent(session.get(Meta, _LAST_PURGE), now):
            return None
    with open_session(url) as session:
        if _recent(session.get(Meta, _LAST_PURGE), now):
            return None
        session.merge(Meta(key=_LAST_PURGE, value=now.isoformat()))
        purged = purge_files(session, older_than_days=older_than_days)
    if signup_days is not None:
        purge_signups(url, days=signup_days, now=now)
    return purged


def purge_signups(url: str, *, days: float, now: datetime | None = None) -> None:
    """Delete the sign-ups older than `days` and the pending recipients they leave, a batch a transaction (so that
    neither the write lock nor memory grows with their number) until none is left."""
    more = True
    while more:
        with open_session(url) as session:
            more = signups.purge_expired(session, days=days, now=now, batch=SIGNUP_BATCH)


def _recent(last: Meta | None, now: datetime) -> bool:
    return last is not None and now - datetime.fromisoformat(last.value) < PURGE_EVERY
