"""`cm worker --drain`, and the housekeeping every worker does: recover jobs whose worker stopped responding,
re-send the message of a job that lost it, purge old staged uploads, release the running jobs on shutdown."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from campaign_manager import db
from campaign_manager.errors import CmError, DatabaseError, QueueError
from campaign_manager.jobs import leases, records, retention, runner
from campaign_manager.jobs.queue import JobQueue, close_huey, get_huey, probe, queue_errors, send_message, unreachable
from campaign_manager.jobs.tasks import DrainOutcome, TaskOutcome

if TYPE_CHECKING:
    from campaign_manager.config import Settings

log = logging.getLogger("campaign_manager.worker")


def recover_jobs(settings: Settings, huey: JobQueue) -> records.Recovery:
    """Re-queue (or give up on) jobs whose worker stopped renewing their lease."""
    recovery = records.recover_stale_jobs(
        settings.database_url,
        enqueue=lambda job_id: send_message(huey, job_id),
        max_attempts=settings.worker.retries + 1,
    )
    for job_id in recovery.requeued:
        log.warning("job %d: its worker stopped responding; back in the queue", job_id)
    for job_id in recovery.failed:
        log.warning("job %d: its worker stopped responding too many times; marked failed", job_id)
    recovery.orphaned = _requeue_orphans(settings, huey)
    return recovery


# A queued job with no message this long after it was created lost it: its `cm` died between committing the job
# and queueing the message. (A message sent twice is harmless: the second finds the job taken and does nothing.)
ORPHAN_AFTER_S = 10.0


def _requeue_orphans(settings: Settings, huey: JobQueue) -> list[int]:
    candidates = records.queued_jobs(settings.database_url, older_than=ORPHAN_AFTER_S)
    if not candidates:
        return []  # the usual case: no need to read (and unpickle) every message on the queue
    try:
        waiting = {task.args[0] for task in [*huey.pending(), *huey.scheduled()] if task.args}
    except queue_errors() as exc:
        raise unreachable(huey.display_url, exc) from None
    orphans = [job_id for job_id in candidates if job_id not in waiting]
    for job_id in orphans:
        send_message(huey, job_id)
        log.warning("job %d: was queued without a message on the queue; sent one", job_id)
    return orphans


def purge_old_files(settings: Settings) -> None:
    """Purge staged uploads past `jobs.keep_files_days`, and sign-ups past `serve.confirm_days`, if no process did
    in the last hour."""
    days = settings.jobs.keep_files_days
    try:
        purged = retention.purge_if_due(
            settings.database_url, older_than_days=days, signup_days=settings.serve.confirm_days
        )
    except db.DatabaseGone:
        raise  # fatal for the worker: its caller stops
    except CmError as exc:
        log.warning("could not purge old staged uploads: %s", exc.message)
        return
    if purged:
        log.info("purged the staged uploads of %d job(s) that ended long ago", len(purged))


def release_jobs(settings: Settings, huey: JobQueue) -> list[int]:
    """Give back the jobs this process is running (a worker stopping before they finish)."""
    released = leases.release_jobs(settings.database_url, enqueue=lambda job_id: send_message(huey, job_id))
    for job_id in released:
        log.warning("job %d released: back in the queue for the next worker", job_id)
    return released


# The outcomes that make a drain fail (exit 9).
FAILURES: tuple[DrainOutcome, ...] = (runner.Outcome.FAILED, runner.Outcome.RETRY, TaskOutcome.ERROR)


@dataclass
class DrainReport:
    outcomes: dict[int, DrainOutcome] = field(default_factory=dict)  # job id -> its last attempt's, in this drain
    recovered: records.Recovery = field(default_factory=records.Recovery)
    released: list[int] = field(default_factory=list)
    waiting: list[tuple[int, datetime | None]] = field(default_factory=list)  # retries not due yet: (job, UTC eta)
    # Why the drain stopped early: the queue or the database could not be reached (the CLI exits 8 or 6).
    queue_error: QueueError | None = None
    database_error: DatabaseError | None = None

    def ids(self, *outcomes: DrainOutcome) -> list[int]:
        return sorted(job_id for job_id, outcome in self.outcomes.items() if outcome in outcomes)

    @property
    def ok(self) -> bool:
        """Every job this drain ran succeeded (a job skipped because someone else had it is not a failure)."""
        return not self.ids(*FAILURES)


def drain(settings: Settings, *, workers: int = 1, grace: float = 30.0) -> DrainReport:
    """Recover stale jobs, move retries that have come due onto the queue, and run everything until the queue is
    empty; retries not yet due stay in the schedule. In the main thread, SIGTERM stops taking jobs and lets the
    running ones finish within `grace` seconds (then releases them); SIGINT releases them at once.

    Raises DatabaseError (a database that does not exist or cannot be opened) or QueueUnreachable before it
    starts; a fault after that stops it, and the report says why (`queue_error`, `database_error`)."""
    db.ensure_schema(settings.database_url, create=settings.database_is_default)
    huey = get_huey(settings, blocking=False)
    report, lock, stop = DrainReport(), threading.Lock(), huey.health.stop
    huey.outcomes = {}
    try:
        probe(huey)
        report.recovered = recover_jobs(settings, huey)
        purge_old_files(settings)
        threads = [
            threading.Thread(target=_drain_loop, args=(huey, report, lock), name=f"drain-{i}", daemon=True)
            for i in range(max(workers, 1))
        ]
        with stop_signals() as shutdown:
            for thread in threads:
                thread.start()
            deadline: float | None = None
            while any(thread.is_alive() for thread in threads):
                if shutdown.requested.is_set():
                    stop.set()
                    deadline = deadline or time.monotonic() + grace
                    if shutdown.now.is_set() or time.monotonic() >= deadline:
                        report.released = release_jobs(settings, huey)
                        break
                shutdown.requested.wait(0.1)
        for thread in threads:
            thread.join(1.0)  # a released handler unwinds at its next progress call
        try:
            report.waiting = [(t.args[0] if t.args else -1, t.eta) for t in huey.scheduled()]
        except queue_errors() as exc:
            report.queue_error = report.queue_error or unreachable(settings.queue_url, exc)
        report.database_error = huey.health.fatal or huey.health.fault
        return report
    finally:
        close_huey(huey)


def _drain_loop(huey: JobQueue, report: DrainReport, lock: threading.Lock) -> None:
    health = huey.health
    while not health.stop.is_set():
        try:
            data = huey.storage.dequeue()
            if data is None:
                with lock:  # one thread at a time moves due retries, so that none gives up while another does
                    due = huey.read_schedule()
                    for task in due:
                        huey.enqueue(task)
                if not due:
                    return
                continue
        except queue_errors() as exc:
            with lock:
                report.queue_error = report.queue_error or unreachable(huey.display_url, exc)
            health.stop.set()
            return
        try:
            task = huey.deserialize_task(data)
        except Exception:
            log.exception("dropped a queue message that cannot be read")
            continue
        try:
            huey.execute(task)
        except queue_errors() as exc:
            # The job ran (or not), but its retry or its next step could not be put on the queue.
            with lock:
                report.queue_error = report.queue_error or unreachable(huey.display_url, exc)
            health.stop.set()
        # None unless the task ran (Huey puts a task whose time has not come back in the schedule).
        outcome = huey.outcomes.pop(task.id, None) if huey.outcomes is not None else None
        if task.args and outcome is not None:
            with lock:
                report.outcomes[int(task.args[0])] = outcome
        if health.fault is not None:
            health.stop.set()  # a cron drain does not wait for the database: the next run tries again


@dataclass
class _Shutdown:
    requested: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)

    def handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT or self.requested.is_set():
            self.now.set()
        self.requested.set()


@contextmanager
def stop_signals() -> Iterator[_Shutdown]:
    """SIGTERM: stop gracefully; SIGINT, or a second signal: stop now. Only the main thread can take signals;
    elsewhere (a drain inside a test thread) this does nothing."""
    shutdown = _Shutdown()
    if threading.current_thread() is not threading.main_thread():
        yield shutdown
        return
    previous = {signum: signal.signal(signum, shutdown.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield shutdown
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
