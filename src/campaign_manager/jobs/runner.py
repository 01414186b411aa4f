"""Running a job: claim it, run its handler under a renewed lease, record how it ended.

A job is claimed atomically (one UPDATE that only matches a queued job, or a running one whose lease has expired),
so a job is run by one worker at a time however many workers or overlapping `cm worker --drain` runs there are.
While its handler runs, a heartbeat renews the lease; a worker that dies stops renewing it, and
`recover_stale_jobs` puts the job back on the queue. Every later write about a run is fenced on
(status running, worker, attempts), so a run that lost its job can never overwrite what a newer run recorded.

Handlers must be idempotent: a job may be run again after a crash, a release or a retry.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.config import Settings

from campaign_manager.db import DatabaseGone, is_unavailable, open_session, settings_session
from campaign_manager.errors import CmError
from campaign_manager.jobs.leases import (
    Run,
    claim,
    error_text,
    fenced,
    hand_back,
    heartbeat,
    merge_progress,
    track,
    untrack,
)
from campaign_manager.jobs.records import Progress, get_handler, get_job, write
from campaign_manager.states import JobStatus
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import Job


class Outcome(StrEnum):
    """What one attempt at a job came to (Attempt.outcome). Not a job status, though three share its spelling: a
    RETRY leaves the job queued, and RELEASED, LOST and FAULT leave it to another run."""

    DONE = "done"
    FAILED = "failed"
    RETRY = "retry"  # failed, back on the queue for another attempt
    SKIPPED = "skipped"  # not run: it had ended, or a live worker holds it
    RELEASED = "released"  # its worker gave it back (shutting down)
    LOST = "lost"  # its lease ran out and another run took it
    FAULT = "fault"  # the database could not be written or reached under it: handed back (see hand_back)
    CANCELLED = "cancelled"  # a run in the foreground was stopped by a signal


log = logging.getLogger("campaign_manager.worker")


class JobReleased(BaseException):
    """Raised inside a handler, from its progress callback, when its worker gives the job back (shutting down) or
    has lost it (its lease expired and another worker took it). A BaseException, so that a handler's
    `except Exception` does not swallow it; the handler's transaction rolls back."""


class JobLost(JobReleased):
    """Raised by a handler that finds, when it goes to commit, that another run holds its job now."""


class JobInterrupted(KeyboardInterrupt):
    """A job run in the foreground (`--wait`) was stopped by SIGINT or SIGTERM: it is cancelled, keeping what it
    committed, and runs again only when someone asks (`cm jobs retry`). A KeyboardInterrupt, because that is what
    drivers know to stop a statement for: psycopg then cancels the query on the server rather than abandon it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def worker_name() -> str:
    """host:pid, recorded on the jobs this process runs."""
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


@dataclass
class Attempt:
    """One attempt at a job: the row as it stands after it, and what came of it (an Outcome; after a FAULT, the
    row as claimed, its `error` saying what went wrong)."""

    job: Job
    outcome: Outcome
    seconds: float = 0.0


@dataclass
class Interrupt:
    """The stop flag of a job run in the foreground, set by a signal handler (see run_in_foreground)."""

    signum: int = 0
    armed: bool = False  # the job's handler is running: a signal raises JobInterrupted right where it lands
    deferred: bool = False  # the handler polls for the signal instead (defer_interrupts)

    def handle(self, signum: int, _frame: Any = None) -> None:
        self.signum = self.signum or signum
        if self.armed and not self.deferred:
            self.armed = False
            raise JobInterrupted(signum)


_current = threading.local()  # the run this thread's handler belongs to


def current_claim() -> tuple[str, int] | None:
    """(worker, attempts) of the claim under which this thread runs a job's handler: the fencing token a handler
    that commits in parts checks before each commit. None outside attempt_job (a handler called directly)."""
    run: Run | None = getattr(_current, "run", None)
    return None if run is None else (run.worker, run.attempts)


def defer_interrupts() -> Callable[[], int]:
    """For a handler that stops cleanly by itself (a send records the messages in flight, then pauses): from now
    on a SIGINT or SIGTERM in `--wait` no longer raises where it lands; the function returned says which signal
    came (0: none), for the handler to poll. Outside a foreground run it always says 0."""
    interrupt: Interrupt | None = getattr(_current, "interrupt", None)
    if interrupt is None:
        return lambda: 0
    interrupt.armed = False
    interrupt.deferred = True
    return lambda: interrupt.signum


def current_settings() -> Settings | None:
    """The settings the caller of attempt_job passed for this thread's handler (`import.segment_rows`, say).
    None outside attempt_job, or when the caller passed none: the handler then uses the defaults."""
    run: Run | None = getattr(_current, "run", None)
    return None if run is None else run.settings


def attempt_job(
    url: str,
    job_id: int,
    *,
    worker: str,
    progress: Progress | None = None,
    retry: bool = False,
    max_attempts: int | None = None,
    lease_seconds: float = 60.0,
    on_start: Callable[[Job], None] | None = None,
    settings: Settings | None = None,
    interrupt: Interrupt | None = None,
) -> Attempt:
    """Claim and run one job. A job that is done, failed, cancelled or held by a live worker is SKIPPED.

    The handler's CmError fails the job at once. Any other exception fails it too, unless `retry` (the caller
    will run it again) and it has had fewer than `max_attempts` claims: then it goes back to queued, error
    recorded, and the outcome is RETRY. Raises NotFound for a job that does not exist.
    """
    job, run = claim(url, job_id, worker=worker, lease=lease_seconds)
    if run is None:
        return Attempt(job, Outcome.SKIPPED)
    run.settings = settings
    track(run)

    def _progress(done: int, total: int) -> None:
        run.done, run.total = done, total
        if interrupt is not None and interrupt.signum and not interrupt.deferred:
            raise JobInterrupted(interrupt.signum)
        if run.stop.is_set():
            raise JobReleased
        if progress is not None:
            progress(done, total)

    beat = threading.Thread(target=heartbeat, args=(url, run), name=f"heartbeat-{job_id}", daemon=True)
    beat.start()
    start = time.monotonic()
    try:
        if on_start is not None:
            on_start(job)
        handler = get_handler(job.kind)
        _current.run, _current.interrupt = run, interrupt
        if interrupt is not None:
            interrupt.armed = not interrupt.signum
        try:
            counts = handler(url, job_id, _progress)
        finally:
            _current.run = _current.interrupt = None
            if interrupt is not None:
                interrupt.armed = False
        values: dict[str, Any] = {"status": JobStatus.DONE, "counts": dict(counts or {}), "error": None}
        outcome = Outcome.DONE
    except JobInterrupted as exc:
        values, outcome = _interrupted(url, job_id, exc.signum)
    except JobLost:
        run.lost = True
        values, outcome = {}, Outcome.LOST
    except JobReleased:
        values, outcome = {}, Outcome.RELEASED
    except DatabaseGone:
        raise  # nothing can be recorded anywhere: the caller stops
    except Exception as exc:
        log.debug("job %d: %s", job_id, error_text(exc), exc_info=True)
        if is_unavailable(exc):
            # Not the job's fault, and not worth an attempt: give it back (below) rather than fail or retry it.
            values, outcome = _fault(job, exc), Outcome.FAULT
        elif isinstance(exc, CmError):
            values, outcome = {"status": JobStatus.FAILED, "error": error_text(exc)}, Outcome.FAILED
        elif retry and (max_attempts is None or run.attempts < max_attempts):
            values, outcome = {"status": JobStatus.QUEUED, "error": error_text(exc)}, Outcome.RETRY
        else:
            suffix = f" (after {run.attempts} attempts)" if run.attempts > 1 else ""
            values, outcome = {"status": JobStatus.FAILED, "error": error_text(exc) + suffix}, Outcome.FAILED
    except BaseException:
        # Ctrl-C in a `--wait` run: nothing will run this job again by itself, so say what happened to it.
        with run.lock:
            if not run.released:
                interrupted = {
                    "status": JobStatus.FAILED,
                    "error": "interrupted",
                    "finished_at": utcnow(),
                    "lease_until": None,
                }
                write(url, fenced(run).values(**interrupted))
        raise
    finally:
        run.finished.set()
        untrack(job_id)
    seconds = time.monotonic() - start
    with run.lock:
        if outcome == Outcome.RELEASED or run.released or run.lost:
            return Attempt(_read(url, job_id), Outcome.LOST if run.lost else Outcome.RELEASED, seconds)
        if outcome != Outcome.FAULT:
            if outcome != Outcome.RETRY:
                values["finished_at"] = utcnow()
            values.update(lease_until=None, result=merge_progress(url, run))
            try:
                if not write(url, fenced(run).values(**values)):
                    log.warning("job %d: lost its lease to another worker before it finished", job_id)
                    outcome = Outcome.LOST
            except Exception as exc:
                if isinstance(exc, DatabaseGone) or not is_unavailable(exc):
                    raise
                values, outcome = _fault(job, exc), Outcome.FAULT  # the work may be done: a handler runs again safely
    if outcome == Outcome.FAULT:
        job.error = values["error"]
        hand_back(url, run, job.error)
        return Attempt(job, Outcome.FAULT, seconds)
    return Attempt(_read(url, job_id), outcome, seconds)


def _interrupted(url: str, job_id: int, signum: int) -> tuple[dict[str, Any], Outcome]:
    """What a job stopped by a signal comes to: cancelled, keeping what its committed parts counted (`cm jobs retry`
    resumes after them), or done if the signal came after its handler had committed everything."""
    job = _read(url, job_id)
    if job.result.get("committed"):
        return {"status": JobStatus.DONE, "counts": dict(job.counts), "error": None}, Outcome.DONE
    error = f"interrupted by {signal.Signals(signum).name}; `cm jobs retry {job_id}` runs the rest"
    return {
        "status": JobStatus.CANCELLED,
        "error": error,
        "counts": dict(job.result.get("partial") or {}),
    }, Outcome.CANCELLED


def _fault(job: Job, exc: BaseException) -> dict[str, Any]:
    """One log line for a database fault under a run; the values recorded when the job is handed back."""
    text = error_text(exc)
    log.warning("job %d (%s): the database cannot be written or reached (%s); handing it back", job.id, job.kind, text)
    return {"error": text}


def run_job(url: str, job_id: int, *, worker: str, progress: Progress | None = None, **options: Any) -> Job:
    """attempt_job, for callers that only need the row: no retry, so it ends done or failed (or untouched, when
    someone else holds it). `options` are attempt_job's. (`--wait` uses run_in_foreground, which also stops on
    SIGINT and SIGTERM.)"""
    return attempt_job(url, job_id, worker=worker, progress=progress, **options).job


def run_in_foreground(
    url: str, job_id: int, *, worker: str, progress: Progress | None = None, settings: Settings | None = None
) -> tuple[Attempt, int]:
    """Run a job in this process (`--wait`), no retry. SIGINT and SIGTERM stop it at once: the part in progress
    rolls back and the job is cancelled with what it committed. Returns the attempt and the signal that stopped it
    (0: none)."""
    interrupt = Interrupt()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, interrupt.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        attempt = attempt_job(url, job_id, worker=worker, progress=progress, settings=settings, interrupt=interrupt)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return attempt, interrupt.signum


def run_now(
    settings: Settings, save: Callable[[Session], Job], *, progress: Progress | None = None
) -> tuple[Attempt, int]:
    """`--wait`: save a job (`save(session)` creates it and stages its input, committed on its own) and run it
    here with run_in_foreground. Returns the attempt and the signal that stopped it (0: none)."""
    with settings_session(settings) as session:
        job_id = int(save(session).id or 0)
    return run_in_foreground(settings.database_url, job_id, worker="cm --wait", progress=progress, settings=settings)


def _read(url: str, job_id: int) -> Job:
    with open_session(url, write=False) as session:
        return get_job(session, job_id)
