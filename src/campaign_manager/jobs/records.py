"""The job table: job kinds and their handlers, queued jobs, what `cm jobs` lists, retries and cancels, and the
recovery of jobs whose worker stopped responding. Running a job is `runner`'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import import_module
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from campaign_manager.db import open_session
from campaign_manager.errors import CmError, Conflict, InvalidInput, NotFound
from campaign_manager.states import JobStatus
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import Job

Progress = Callable[[int, int], None]


Handler = Callable[[str, int, Progress], dict[str, Any]]


# kind -> "module:function", imported on first use so that `cm` starts without loading every handler.
HANDLERS: dict[str, str] = {
    "import": "campaign_manager.imports.service:run_import_job",
    "send": "campaign_manager.sending.job:run_send_job",
    "confirm": "campaign_manager.sending.confirmations:run_confirm_job",  # a sign-up's confirmation message
}


_loaded: dict[str, Handler] = {}


def register_handler(kind: str, func: Handler | str) -> None:
    """Add a job kind (tests register throwaway kinds; always unregister them)."""
    if isinstance(func, str):
        HANDLERS[kind] = func
        _loaded.pop(kind, None)
    else:
        HANDLERS[kind] = f"{func.__module__}:{func.__qualname__}"
        _loaded[kind] = func


def unregister_handler(kind: str) -> None:
    HANDLERS.pop(kind, None)
    _loaded.pop(kind, None)


def get_handler(kind: str) -> Handler:
    """The handler of `kind`, imported once. A kind nobody handles is a permanent failure (CmError)."""
    if kind not in _loaded:
        target = HANDLERS.get(kind)
        if target is None:
            raise InvalidInput(f"no handler for job kind {kind!r}", hint=f"known kinds: {', '.join(sorted(HANDLERS))}")
        module, _, name = target.partition(":")
        try:
            handler: Handler = getattr(import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise CmError(f"cannot load the handler of job kind {kind!r} ({target}): {exc}") from None
        _loaded[kind] = handler
    return _loaded[kind]


def create_job(session: Session, kind: str, args: dict[str, Any]) -> Job:
    """A queued job row (flushed, so it has an id). The caller commits, then enqueues it (queue.enqueue_job)."""
    if kind not in HANDLERS:
        raise InvalidInput(f"unknown job kind {kind!r}", hint=f"known kinds: {', '.join(sorted(HANDLERS))}")
    job = Job(kind=kind, args=dict(args), status=JobStatus.QUEUED)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"no job {job_id}", hint="see `cm jobs list`")
    return job


def list_jobs(session: Session, *, status: str | None = None, limit: int | None = 50) -> list[Job]:
    """Newest first."""
    query = select(Job).order_by(col(Job.id).desc())
    if status is not None:
        if status not in list(JobStatus):
            raise InvalidInput(f"unknown job status {status!r}", hint=f"one of {', '.join(JobStatus)}")
        query = query.where(Job.status == status)
    if limit is not None:
        query = query.limit(limit)
    return list(session.exec(query).all())


def jobs_page(session: Session, *, status: str | None = None, after: int = 0, limit: int) -> list[Job]:
    """One page of jobs (the REST API's listing): ids above `after`, oldest first, at most `limit`."""
    query = select(Job).where(col(Job.id) > after).order_by(col(Job.id)).limit(limit)
    if status is not None:
        if status not in list(JobStatus):
            raise InvalidInput(f"unknown job status {status!r}", hint=f"one of {', '.join(JobStatus)}")
        query = query.where(Job.status == status)
    return list(session.exec(query).all())


def describe_job(job: Job) -> dict[str, Any]:
    """The job as `cm jobs` shows it (table and --json alike)."""
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "worker": job.worker,
        "error": job.error,
        "counts": dict(job.counts or {}),
        "progress": (job.result or {}).get("progress"),
        "args": dict(job.args or {}),
    }


def retry_job(session: Session, job_id: int) -> Job:
    """Queue a failed or cancelled job again, with a fresh budget of attempts (the caller commits, then enqueues
    it). An import resumes after its last committed segment. A job whose staged upload was purged cannot be."""
    job = get_job(session, job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise Conflict(f"job {job_id} is {job.status}: only a failed or cancelled job can be retried")
    purged = (job.result or {}).get("file_purged")
    if purged:
        raise NotFound(
            f"job {job_id} cannot be retried: its staged upload was purged on {str(purged)[:10]}",
            hint="queue the file again",
        )
    requeued = session.exec(
        sa.update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == job.status)
        .values(status=JobStatus.QUEUED, attempts=0, error=None, finished_at=None, lease_until=None, worker=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not requeued:
        raise Conflict(f"job {job_id} changed meanwhile", hint="try again")
    return get_job(session, job_id)


def cancel_job(session: Session, job_id: int) -> Job:
    """Cancel a job that has not started (or is waiting for a retry). Its queue message, when a worker takes it,
    finds the job cancelled and does nothing."""
    cancelled = session.exec(
        sa.update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow(), lease_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    job = get_job(session, job_id)
    if not cancelled:
        hint = (
            "it cannot be stopped from here; stop its worker to release it" if job.status == JobStatus.RUNNING else None
        )
        raise Conflict(f"job {job_id} is {job.status}: only a queued job can be cancelled", hint=hint)
    return job


def write(url: str, statement: Any) -> int:
    with open_session(url) as session:
        return int(session.exec(statement).rowcount)


@dataclass
class Recovery:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    orphaned: list[int] = field(default_factory=list)  # queued jobs whose message never reached the queue


def queued_jobs(url: str, *, older_than: float) -> list[int]:
    """Jobs that have been `queued` since more than `older_than` seconds ago."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    with open_session(url, write=False) as session:
        rows = session.exec(
            select(Job.id)
            .where(col(Job.status) == JobStatus.QUEUED, col(Job.created_at) < cutoff)
            .order_by(col(Job.id))
        ).all()
    return [job_id for job_id in rows if job_id is not None]


def recover_stale_jobs(
    url: str, *, enqueue: Callable[[int], None] | None = None, max_attempts: int | None = None
) -> Recovery:
    """Running jobs whose lease has expired (their worker died or hung) go back to queued, and `enqueue(id)` puts
    a message for each on the queue; a job claimed `max_attempts` times already is failed instead, so a job that
    kills its worker cannot loop forever.

    The message goes first: a crash in between leaves the job running-and-expired (found again next time) or
    doubly queued (the second message finds it taken and does nothing), never queued without a message.
    """
    now = utcnow()
    recovery = Recovery()
    with open_session(url, write=False) as session:
        stale = session.exec(
            select(Job.id, Job.attempts, Job.worker).where(
                col(Job.status) == JobStatus.RUNNING, col(Job.lease_until) < now
            )
        ).all()
    for job_id, attempts, worker in stale:
        assert job_id is not None
        still_stale = (
            sa.update(Job)
            .where(
                col(Job.id) == job_id,
                col(Job.status) == JobStatus.RUNNING,
                col(Job.attempts) == attempts,
                col(Job.lease_until) < now,
            )
            .execution_options(synchronize_session=False)
        )
        if max_attempts is not None and attempts >= max_attempts:
            error = f"its worker ({worker}) stopped responding; gave up after {attempts} attempts"
            if write(url, still_stale.values(status=JobStatus.FAILED, error=error, finished_at=now, lease_until=None)):
                recovery.failed.append(job_id)
            continue
        if enqueue is not None:
            enqueue(job_id)
        if write(url, still_stale.values(status=JobStatus.QUEUED, lease_until=None)):
            recovery.requeued.append(job_id)
    return recovery
