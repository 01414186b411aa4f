"""Claims and leases: a job is claimed atomically (one UPDATE that only matches a queued job, or a running one whose
lease has expired), its lease renewed by a heartbeat while it runs, and every later write about the run fenced on
(status running, worker, attempts), so that a run that lost its job never overwrites what a newer run recorded.
A database fault hands the job back; a stopping worker releases the jobs it runs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import col

from campaign_manager.db import DatabaseGone, discard_connections, is_sqlite, is_unavailable, open_session
from campaign_manager.errors import CmError
from campaign_manager.jobs.records import get_job, write
from campaign_manager.models import Job, utcnow
from campaign_manager.states import JobStatus

if TYPE_CHECKING:
    from campaign_manager.config import Settings

log = logging.getLogger("campaign_manager.worker")


@dataclass
class Run:
    """A job this process is running: the fencing token of its claim, its progress, and the flags the heartbeat
    and a shutdown use to take it back."""

    job_id: int
    worker: str
    attempts: int
    lease: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    released: bool = False
    lost: bool = False
    done: int | None = None  # the handler's last progress call, if any
    total: int = 0
    settings: Settings | None = None  # what the handler reads through runner.current_settings


_active: dict[int, Run] = {}


_active_lock = threading.Lock()


def fenced(run: Run) -> Any:
    """An UPDATE of the job that only applies while this run still holds it."""
    return (
        sa.update(Job)
        .where(
            col(Job.id) == run.job_id,
            col(Job.status) == JobStatus.RUNNING,
            col(Job.worker) == run.worker,
            col(Job.attempts) == run.attempts,
        )
        .execution_options(synchronize_session=False)
    )


def merge_progress(url: str, run: Run) -> Any:
    """`result` with its "progress" key set, merged in the database: the handler may be writing other keys of
    `result` in its own transaction, and a read-modify-write here would undo them."""
    if run.done is None:
        return col(Job.result)
    value = {"done": run.done, "total": run.total}
    if is_sqlite(url):
        return sa.func.json_set(col(Job.result), "$.progress", sa.func.json(json.dumps(value)))
    from sqlalchemy.dialects.postgresql import JSONB

    progress = sa.func.jsonb_build_object("progress", sa.literal(value, JSONB))
    return sa.cast(sa.cast(col(Job.result), JSONB).op("||")(progress), sa.JSON)


def claim(url: str, job_id: int, *, worker: str, lease: float) -> tuple[Job, Run | None]:
    now = utcnow()
    with open_session(url) as session:
        claimed = session.exec(
            sa.update(Job)
            .where(
                col(Job.id) == job_id,
                sa.or_(
                    col(Job.status) == JobStatus.QUEUED,
                    sa.and_(col(Job.status) == JobStatus.RUNNING, col(Job.lease_until) < now),
                ),
            )
            .values(
                status=JobStatus.RUNNING,
                attempts=col(Job.attempts) + 1,
                worker=worker,
                started_at=now,
                finished_at=None,
                lease_until=now + timedelta(seconds=lease),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        job = get_job(session, job_id)
    return job, (Run(job_id, worker, job.attempts, lease) if claimed else None)


def heartbeat(url: str, run: Run) -> None:
    interval = min(run.lease / 3, 5.0)
    while not run.finished.wait(interval):
        with run.lock:
            if run.released:
                return
            try:
                renewed = write(
                    url,
                    fenced(run).values(
                        lease_until=utcnow() + timedelta(seconds=run.lease), result=merge_progress(url, run)
                    ),
                )
            except CmError as exc:
                # The lease is long enough to survive a few missed beats (a SQLite write lock held by the handler).
                log.debug("job %d: heartbeat failed: %s", run.job_id, exc.message)
                continue
            if not renewed:
                log.warning("job %d: lost its lease to another worker; abandoning this run", run.job_id)
                run.lost = True
                run.stop.set()
                return


# Handing a job back after a database fault: the write is tried again this often (doubling), for up to a lease.
HAND_BACK_FIRST_DELAY_S, HAND_BACK_MAX_DELAY_S = 0.25, 5.0


def hand_back(url: str, run: Run, error: str) -> bool:
    """The database failed under a run: put the job back to queued, its attempt not counted. The write is tried
    on fresh connections (a pooled PostgreSQL one may be dead, or a session made while the database was
    read-only), again and again (capped backoff) for up to a lease, so that it goes through as soon as the
    database takes writes. False if it never did: the lease then runs out, and recovery takes the job."""
    statement = fenced(run).values(
        status=JobStatus.QUEUED, lease_until=None, attempts=col(Job.attempts) - 1, error=f"handed back: {error}"
    )
    deadline, delay = time.monotonic() + run.lease, HAND_BACK_FIRST_DELAY_S
    while True:
        discard_connections(url)
        try:
            write(url, statement)  # no row: another worker holds the job now, and nothing is ours to give back
            return True
        except DatabaseGone:
            raise
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.debug("job %d: cannot hand it back yet: %s", run.job_id, error_text(exc))
        if time.monotonic() + delay > deadline:
            log.warning("job %d: could not hand it back; it is taken again once its lease runs out", run.job_id)
            return False
        time.sleep(delay)
        delay = min(delay * 2, HAND_BACK_MAX_DELAY_S)


def track(run: Run) -> None:
    """Note a run this process has started (release_jobs gives it back on shutdown)."""
    with _active_lock:
        _active[run.job_id] = run


def untrack(job_id: int) -> None:
    with _active_lock:
        _active.pop(job_id, None)


def release_jobs(url: str, *, enqueue: Callable[[int], None]) -> list[int]:
    """Give back every job this process is running (a worker shutting down): each goes back to queued with a
    message on the queue, its attempt not counted, and its handler is told to stop (JobReleased, at its next
    progress call). A handler that never calls progress runs on until the process exits, which rolls it back."""
    with _active_lock:
        runs = list(_active.values())
    released = []
    for run in runs:
        with run.lock:
            if run.released or run.finished.is_set():
                continue
            run.released = True
            run.stop.set()
            # Expire the lease first: from here on the job is claimable, and recoverable if we die.
            expired = write(
                url,
                fenced(run).values(lease_until=utcnow() - timedelta(seconds=1), attempts=col(Job.attempts) - 1),
            )
        if not expired:
            continue
        run.attempts -= 1
        enqueue(run.job_id)
        write(
            url,
            fenced(run)
            .where(col(Job.lease_until) < utcnow())
            .values(status=JobStatus.QUEUED, lease_until=None, error="released by a stopping worker"),
        )
        released.append(run.job_id)
    return released


def active_jobs() -> list[int]:
    """Ids of the jobs this process is running now."""
    with _active_lock:
        return sorted(_active)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, CmError):
        return exc.message + (f" ({exc.hint})" if exc.hint else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
