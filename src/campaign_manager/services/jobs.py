"""Job rows: what was queued, who is running it, and how it ended, whatever the queue backend.

A job is claimed atomically (one UPDATE that only matches a queued job, or a running one whose lease has expired),
so a job is run by one worker at a time however many workers or overlapping `cm worker --drain` runs there are.
While its handler runs, a heartbeat renews the lease; a worker that dies stops renewing it, and
`recover_stale_jobs` puts the job back on the queue. Every later write about a run is fenced on
(status running, worker, attempts), so a run that lost its job can never overwrite what a newer run recorded.

Handlers must be idempotent: a job may be run again after a crash, a release or a retry.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import import_module
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from campaign_manager.db import DatabaseGone, discard_connections, is_sqlite, is_unavailable, open_session
from campaign_manager.errors import CmError, Conflict, InvalidInput, NotFound
from campaign_manager.models import (
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_STATUSES,
    Job,
    utcnow,
)

Progress = Callable[[int, int], None]
Handler = Callable[[str, int, Progress], dict[str, Any]]

# Settings a job's handler may read through current_option: callers of attempt_job pass these.
OPTION_KEYS = ("import.segment_rows",)
# kind -> "module:function", imported on first use so that `cm` starts without loading every handler.
HANDLERS: dict[str, str] = {
    "import": "campaign_manager.services.imports:run_import_job",
}
_loaded: dict[str, Handler] = {}

# What one attempt at a job came to (Attempt.outcome). FAULT: the database could not be written or reached under
# it; the job was handed back (see _hand_back). CANCELLED: a run in the foreground was stopped by a signal.
DONE, FAILED, RETRY, SKIPPED, RELEASED, LOST, FAULT, CANCELLED = (
    "done",
    "failed",
    "retry",
    "skipped",
    "released",
    "lost",
    "fault",
    "cancelled",
)

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


def worker_name() -> str:
    """host:pid, recorded on the jobs this process runs."""
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


# -- the job table, for the CLI ---------------------------------------------------------------------------------


def create_job(session: Session, kind: str, args: dict[str, Any]) -> Job:
    """A queued job row (flushed, so it has an id). The caller commits, then enqueues it (queue.enqueue_job)."""
    if kind not in HANDLERS:
        raise InvalidInput(f"unknown job kind {kind!r}", hint=f"known kinds: {', '.join(sorted(HANDLERS))}")
    job = Job(kind=kind, args=dict(args), status=JOB_QUEUED)
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
        if status not in JOB_STATUSES:
            raise InvalidInput(f"unknown job status {status!r}", hint=f"one of {', '.join(JOB_STATUSES)}")
        query = query.where(Job.status == status)
    if limit is not None:
        query = query.limit(limit)
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
    if job.status not in (JOB_FAILED, JOB_CANCELLED):
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
        .values(status=JOB_QUEUED, attempts=0, error=None, finished_at=None, lease_until=None, worker=None)
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
        .where(col(Job.id) == job_id, col(Job.status) == JOB_QUEUED)
        .values(status=JOB_CANCELLED, finished_at=utcnow(), lease_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    job = get_job(session, job_id)
    if not cancelled:
        hint = "it cannot be stopped from here; stop its worker to release it" if job.status == JOB_RUNNING else None
        raise Conflict(f"job {job_id} is {job.status}: only a queued job can be cancelled", hint=hint)
    return job


# -- running a job ----------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One attempt at a job: the row as it stands after it, and what came of it (DONE, FAILED, RETRY, SKIPPED,
    RELEASED, LOST or FAULT: then the row as claimed, its `error` saying what went wrong)."""

    job: Job
    outcome: str
    seconds: float = 0.0


@dataclass
class _Run:
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
    options: dict[str, Any] = field(default_factory=dict)  # settings the handler may ask for (current_option)


@dataclass
class Interrupt:
    """The stop flag of a job run in the foreground, set by a signal handler (see run_in_foreground)."""

    signum: int = 0
    armed: bool = False  # the job's handler is running: a signal raises JobInterrupted right where it lands

    def handle(self, signum: int, _frame: Any = None) -> None:
        self.signum = self.signum or signum
        if self.armed:
            self.armed = False
            raise JobInterrupted(signum)


_active: dict[int, _Run] = {}
_active_lock = threading.Lock()
_current = threading.local()  # the run this thread's handler belongs to


def current_claim() -> tuple[str, int] | None:
    """(worker, attempts) of the claim under which this thread runs a job's handler: the fencing token a handler
    that commits in parts checks before each commit. None outside attempt_job (a handler called directly)."""
    run: _Run | None = getattr(_current, "run", None)
    return None if run is None else (run.worker, run.attempts)


def current_option(key: str, default: Any = None) -> Any:
    """A setting the caller of attempt_job passed for the handler (e.g. `import.segment_rows`)."""
    run: _Run | None = getattr(_current, "run", None)
    return default if run is None else run.options.get(key, default)


def _fenced(run: _Run) -> Any:
    """An UPDATE of the job that only applies while this run still holds it."""
    return (
        sa.update(Job)
        .where(
            col(Job.id) == run.job_id,
            col(Job.status) == JOB_RUNNING,
            col(Job.worker) == run.worker,
            col(Job.attempts) == run.attempts,
        )
        .execution_options(synchronize_session=False)
    )


def _merge_progress(url: str, run: _Run) -> Any:
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


def _write(url: str, statement: Any) -> int:
    with open_session(url) as session:
        return int(session.exec(statement).rowcount)


def _claim(url: str, job_id: int, *, worker: str, lease: float) -> tuple[Job, _Run | None]:
    now = utcnow()
    with open_session(url) as session:
        claimed = session.exec(
            sa.update(Job)
            .where(
                col(Job.id) == job_id,
                sa.or_(
                    col(Job.status) == JOB_QUEUED,
                    sa.and_(col(Job.status) == JOB_RUNNING, col(Job.lease_until) < now),
                ),
            )
            .values(
                status=JOB_RUNNING,
                attempts=col(Job.attempts) + 1,
                worker=worker,
                started_at=now,
                finished_at=None,
                lease_until=now + timedelta(seconds=lease),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        job = get_job(session, job_id)
    return job, (_Run(job_id, worker, job.attempts, lease) if claimed else None)


def _heartbeat(url: str, run: _Run) -> None:
    interval = min(run.lease / 3, 5.0)
    while not run.finished.wait(interval):
        with run.lock:
            if run.released:
                return
            try:
                renewed = _write(
                    url,
                    _fenced(run).values(
                        lease_until=utcnow() + timedelta(seconds=run.lease), result=_merge_progress(url, run)
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


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CmError):
        return exc.message + (f" ({exc.hint})" if exc.hint else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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
    options: dict[str, Any] | None = None,
    interrupt: Interrupt | None = None,
) -> Attempt:
    """Claim and run one job. A job that is done, failed, cancelled or held by a live worker is SKIPPED.

    The handler's CmError fails the job at once. Any other exception fails it too, unless `retry` (the caller
    will run it again) and it has had fewer than `max_attempts` claims: then it goes back to queued, error
    recorded, and the outcome is RETRY. Raises NotFound for a job that does not exist.
    """
    job, run = _claim(url, job_id, worker=worker, lease=lease_seconds)
    if run is None:
        return Attempt(job, SKIPPED)
    run.options = dict(options or {})
    with _active_lock:
        _active[job_id] = run

    def _progress(done: int, total: int) -> None:
        run.done, run.total = done, total
        if interrupt is not None and interrupt.signum:
            raise JobInterrupted(interrupt.signum)
        if run.stop.is_set():
            raise JobReleased
        if progress is not None:
            progress(done, total)

    beat = threading.Thread(target=_heartbeat, args=(url, run), name=f"heartbeat-{job_id}", daemon=True)
    beat.start()
    start = time.monotonic()
    try:
        if on_start is not None:
            on_start(job)
        handler = get_handler(job.kind)
        _current.run = run
        if interrupt is not None:
            interrupt.armed = not interrupt.signum
        try:
            counts = handler(url, job_id, _progress)
        finally:
            _current.run = None
            if interrupt is not None:
                interrupt.armed = False
        values: dict[str, Any] = {"status": JOB_DONE, "counts": dict(counts or {}), "error": None}
        outcome = DONE
    except JobInterrupted as exc:
        values, outcome = _interrupted(url, job_id, exc.signum)
    except JobLost:
        run.lost = True
        values, outcome = {}, LOST
    except JobReleased:
        values, outcome = {}, RELEASED
    except DatabaseGone:
        raise  # nothing can be recorded anywhere: the caller stops
    except Exception as exc:
        log.debug("job %d: %s", job_id, _error_text(exc), exc_info=True)
        if is_unavailable(exc):
            # Not the job's fault, and not worth an attempt: give it back (below) rather than fail or retry it.
            values, outcome = _fault(job, exc), FAULT
        elif isinstance(exc, CmError):
            values, outcome = {"status": JOB_FAILED, "error": _error_text(exc)}, FAILED
        elif retry and (max_attempts is None or run.attempts < max_attempts):
            values, outcome = {"status": JOB_QUEUED, "error": _error_text(exc)}, RETRY
        else:
            suffix = f" (after {run.attempts} attempts)" if run.attempts > 1 else ""
            values, outcome = {"status": JOB_FAILED, "error": _error_text(exc) + suffix}, FAILED
    except BaseException:
        # Ctrl-C in a `--wait` run: nothing will run this job again by itself, so say what happened to it.
        with run.lock:
            if not run.released:
                interrupted = {
                    "status": JOB_FAILED,
                    "error": "interrupted",
                    "finished_at": utcnow(),
                    "lease_until": None,
                }
                _write(url, _fenced(run).values(**interrupted))
        raise
    finally:
        run.finished.set()
        with _active_lock:
            _active.pop(job_id, None)
    seconds = time.monotonic() - start
    with run.lock:
        if outcome == RELEASED or run.released or run.lost:
            return Attempt(_read(url, job_id), LOST if run.lost else RELEASED, seconds)
        if outcome != FAULT:
            if outcome != RETRY:
                values["finished_at"] = utcnow()
            values.update(lease_until=None, result=_merge_progress(url, run))
            try:
                if not _write(url, _fenced(run).values(**values)):
                    log.warning("job %d: lost its lease to another worker before it finished", job_id)
                    outcome = LOST
            except Exception as exc:
                if isinstance(exc, DatabaseGone) or not is_unavailable(exc):
                    raise
                values, outcome = _fault(job, exc), FAULT  # the work may be done: a handler runs again safely
    if outcome == FAULT:
        job.error = values["error"]
        _hand_back(url, run, job.error)
        return Attempt(job, FAULT, seconds)
    return Attempt(_read(url, job_id), outcome, seconds)


def _interrupted(url: str, job_id: int, signum: int) -> tuple[dict[str, Any], str]:
    """What a job stopped by a signal comes to: cancelled, keeping what its committed parts counted (`cm jobs retry`
    resumes after them), or done if the signal came after its handler had committed everything."""
    job = _read(url, job_id)
    if job.result.get("committed"):
        return {"status": JOB_DONE, "counts": dict(job.counts), "error": None}, DONE
    error = f"interrupted by {signal.Signals(signum).name}; `cm jobs retry {job_id}` runs the rest"
    return {"status": JOB_CANCELLED, "error": error, "counts": dict(job.result.get("partial") or {})}, CANCELLED


def _fault(job: Job, exc: BaseException) -> dict[str, Any]:
    """One log line for a database fault under a run; the values recorded when the job is handed back."""
    text = _error_text(exc)
    log.warning("job %d (%s): the database cannot be written or reached (%s); handing it back", job.id, job.kind, text)
    return {"error": text}


# Handing a job back after a database fault: the write is tried again this often (doubling), for up to a lease.
HAND_BACK_FIRST_DELAY_S, HAND_BACK_MAX_DELAY_S = 0.25, 5.0


def _hand_back(url: str, run: _Run, error: str) -> bool:
    """The database failed under a run: put the job back to queued, its attempt not counted. The write is tried
    on fresh connections (a pooled PostgreSQL one may be dead, or a session made while the database was
    read-only), again and again (capped backoff) for up to a lease, so that it goes through as soon as the
    database takes writes. False if it never did: the lease then runs out, and recovery takes the job."""
    statement = _fenced(run).values(
        status=JOB_QUEUED, lease_until=None, attempts=col(Job.attempts) - 1, error=f"handed back: {error}"
    )
    deadline, delay = time.monotonic() + run.lease, HAND_BACK_FIRST_DELAY_S
    while True:
        discard_connections(url)
        try:
            _write(url, statement)  # no row: another worker holds the job now, and nothing is ours to give back
            return True
        except DatabaseGone:
            raise
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.debug("job %d: cannot hand it back yet: %s", run.job_id, _error_text(exc))
        if time.monotonic() + delay > deadline:
            log.warning("job %d: could not hand it back; it is taken again once its lease runs out", run.job_id)
            return False
        time.sleep(delay)
        delay = min(delay * 2, HAND_BACK_MAX_DELAY_S)


def run_job(url: str, job_id: int, *, worker: str, progress: Progress | None = None, **options: Any) -> Job:
    """attempt_job, for callers that only need the row: no retry, so it ends done or failed (or untouched, when
    someone else holds it). `options` are attempt_job's. (`--wait` uses run_in_foreground, which also stops on
    SIGINT and SIGTERM.)"""
    return attempt_job(url, job_id, worker=worker, progress=progress, **options).job


def run_in_foreground(
    url: str, job_id: int, *, worker: str, progress: Progress | None = None, options: dict[str, Any] | None = None
) -> tuple[Attempt, int]:
    """Run a job in this process (`--wait`), no retry. SIGINT and SIGTERM stop it at once: the part in progress
    rolls back and the job is cancelled with what it committed. Returns the attempt and the signal that stopped it
    (0: none)."""
    interrupt = Interrupt()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, interrupt.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        attempt = attempt_job(url, job_id, worker=worker, progress=progress, options=options, interrupt=interrupt)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return attempt, interrupt.signum


def _read(url: str, job_id: int) -> Job:
    with open_session(url, write=False) as session:
        return get_job(session, job_id)


# -- getting jobs back ------------------------------------------------------------------------------------------


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
            select(Job.id).where(col(Job.status) == JOB_QUEUED, col(Job.created_at) < cutoff).order_by(col(Job.id))
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
            select(Job.id, Job.attempts, Job.worker).where(col(Job.status) == JOB_RUNNING, col(Job.lease_until) < now)
        ).all()
    for job_id, attempts, worker in stale:
        assert job_id is not None
        still_stale = (
            sa.update(Job)
            .where(
                col(Job.id) == job_id,
                col(Job.status) == JOB_RUNNING,
                col(Job.attempts) == attempts,
                col(Job.lease_until) < now,
            )
            .execution_options(synchronize_session=False)
        )
        if max_attempts is not None and attempts >= max_attempts:
            error = f"its worker ({worker}) stopped responding; gave up after {attempts} attempts"
            if _write(url, still_stale.values(status=JOB_FAILED, error=error, finished_at=now, lease_until=None)):
                recovery.failed.append(job_id)
            continue
        if enqueue is not None:
            enqueue(job_id)
        if _write(url, still_stale.values(status=JOB_QUEUED, lease_until=None)):
            recovery.requeued.append(job_id)
    return recovery


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
            expired = _write(
                url,
                _fenced(run).values(lease_until=utcnow() - timedelta(seconds=1), attempts=col(Job.attempts) - 1),
            )
        if not expired:
            continue
        run.attempts -= 1
        enqueue(run.job_id)
        _write(
            url,
            _fenced(run)
            .where(col(Job.lease_until) < utcnow())
            .values(status=JOB_QUEUED, lease_until=None, error="released by a stopping worker"),
        )
        released.append(run.job_id)
    return released


def active_jobs() -> list[int]:
    """Ids of the jobs this process is running now."""
    with _active_lock:
        return sorted(_active)
