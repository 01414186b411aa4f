"""cm's one Huey task: run the job a message names (through `runner`), and log how it went. Faults around a job are
not the job's: a database that cannot be written or reached gets the job handed back (its attempt not counted) and
the message sent again after a delay that grows while the fault lasts; a SQLite file deleted or replaced under the
worker stops it."""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from huey.exceptions import RetryTask

from campaign_manager import db
from campaign_manager.errors import DatabaseError, NotFound
from campaign_manager.jobs import runner
from campaign_manager.jobs.health import Health, first_line
from campaign_manager.states import JobStatus

if TYPE_CHECKING:
    from campaign_manager.config import Settings

log = logging.getLogger("campaign_manager.worker")


class TaskOutcome(StrEnum):
    """A drain's outcome beside the attempt's own (runner.Outcome)."""

    ERROR = "error"  # the task itself failed, before or around an attempt (the database was unreachable, say)


DrainOutcome = runner.Outcome | TaskOutcome  # what a task came to, as a drain reports it for its job


class _RetryLater(Exception):
    """Raised by the task so that Huey schedules its retry (with backoff); the job row already holds the error."""


class _QuietRetries(logging.Filter):
    """Huey logs every exception a task raises, traceback and all; a retry is already logged by us, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _RetryLater))


logging.getLogger("huey").addFilter(_QuietRetries())


def _note_outcome(huey: Any, task: Any, value: DrainOutcome, exc: BaseException | None) -> None:
    """Huey's post-execute hook: what a task came to, into `huey.outcomes` (by the message's id) while a drain
    collects them (a long-running worker does not: None). A retry is raised, so it is known by its exception;
    any other exception (the database out of reach, say) is ERROR."""
    if huey.outcomes is None or not task.args:
        return
    raised = runner.Outcome.RETRY if isinstance(exc, _RetryLater) else TaskOutcome.ERROR
    huey.outcomes[task.id] = value if exc is None else raised


def define_task(huey: Any, settings: Settings) -> Any:
    url = settings.database_url
    retries, lease = settings.worker.retries, settings.worker.lease_seconds

    @huey.task(  # type: ignore[untyped-decorator]  # huey ships no type hints
        retries=retries,
        retry_delay=settings.worker.retry_delay,
        retry_backoff=settings.worker.retry_backoff,
        context=True,
        name="run_job",
    )
    def run_job_task(job_id: int, task: Any = None) -> DrainOutcome:
        retries_left = int(task.retries) if task is not None else 0
        return _run(
            huey.health,
            url,
            job_id,
            retries_left=retries_left,
            max_attempts=retries + 1,
            lease=lease,
            settings=settings,
        )

    huey.post_execute(name="outcomes")(lambda task, value, exc: _note_outcome(huey, task, value, exc))
    return run_job_task


# A message can arrive before the transaction that saved its job commits (submit_job queues it first, so that a
# command that fails leaves no job behind): wait this long for the job to appear before dropping the message.
NOT_YET_SAVED_S = 5.0


def _run(
    health: Health,
    url: str,
    job_id: int,
    *,
    retries_left: int,
    max_attempts: int,
    lease: float,
    settings: Settings,
) -> DrainOutcome:
    deadline = time.monotonic() + NOT_YET_SAVED_S
    while True:
        try:
            attempt = runner.attempt_job(
                url,
                job_id,
                worker=runner.worker_name(),
                retry=retries_left > 0,
                max_attempts=max_attempts,
                lease_seconds=lease,
                on_start=_log_start,
                settings=settings,
            )
            break
        except NotFound:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            log.warning("job %d does not exist; its queue message is dropped", job_id)
            return runner.Outcome.SKIPPED
        except db.DatabaseGone as exc:
            health.stop_for(exc)
            return TaskOutcome.ERROR
        except Exception as exc:
            if not db.is_unavailable(exc):
                raise
            # Nothing was claimed (or the job already ended): only the message needs sending again, later.
            health.fault = exc if isinstance(exc, DatabaseError) else db.DatabaseUnavailable(first_line(exc))
            line = f"job {job_id}: the database cannot be written or reached ({first_line(exc)})"
            raise RetryTask(delay=health.database.failed(line)) from None
    if attempt.outcome == runner.Outcome.FAULT:
        # Logged by attempt_job, and handed back: run it again once the delay is over (Huey's retry that does
        # not count: RetryTask leaves the task's retries as they were).
        reason = f"the database cannot be written or reached ({attempt.job.error})"
        health.fault = db.DatabaseUnavailable(f"{reason}; job {job_id} goes back to the queue")
        raise RetryTask(delay=health.database.failed(None))
    health.database.succeeded()
    _log_end(attempt)
    if attempt.outcome == runner.Outcome.RETRY:
        raise _RetryLater(attempt.job.error)
    return attempt.outcome


def _fields(job: Any, **more: Any) -> dict[str, Any]:
    return {"fields": {"job_id": job.id, "kind": job.kind, "status": job.status, **more}}


def _log_start(job: Any) -> None:
    log.info("job %d (%s) started, attempt %d", job.id, job.kind, job.attempts, extra=_fields(job))


def _log_end(attempt: runner.Attempt) -> None:
    job, outcome, secs = attempt.job, attempt.outcome, attempt.seconds
    extra = _fields(job, outcome=outcome, seconds=round(secs, 3))
    if outcome == runner.Outcome.DONE:
        counts = ", ".join(f"{k}={v}" for k, v in job.counts.items()) or "no counts"
        log.info("job %d (%s) done in %.1fs: %s", job.id, job.kind, secs, counts, extra=extra)
    elif outcome == runner.Outcome.FAILED:
        log.warning("job %d (%s) failed: %s", job.id, job.kind, job.error, extra=extra)
    elif outcome == runner.Outcome.RETRY:
        log.warning("job %d (%s) failed, will be retried: %s", job.id, job.kind, job.error, extra=extra)
    elif outcome == runner.Outcome.SKIPPED:
        held = f" by {job.worker}" if job.status == JobStatus.RUNNING else ""
        log.info("job %d (%s) skipped: it is %s%s", job.id, job.kind, job.status, held, extra=extra)
    else:
        log.warning("job %d (%s) %s: it will run again", job.id, job.kind, outcome, extra=extra)
