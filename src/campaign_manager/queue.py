"""The Huey queue: its storage (from `queue.url`), cm's one task, and the two ways to consume it.

The queue only carries job ids. What a job is and how it ended lives in the job row (services/jobs.py), which
is also what makes consuming safe: a message is only a hint to run a job, and the job's atomic claim decides
whether this worker runs it. A message that arrives twice, late, or for a cancelled job does nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from huey import Huey
from huey.exceptions import ConfigurationError
from huey.storage import PostgresStorage, RedisStorage, SqliteStorage

from campaign_manager.db import is_sqlite, sqlite_path
from campaign_manager.errors import CmError, NotFound, QueueError
from campaign_manager.services import jobs, retention

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.config import Settings
    from campaign_manager.models import Job

log = logging.getLogger("campaign_manager.worker")

BUSY_TIMEOUT_S = 30.0  # SQLite queue: how long a writer waits for another before "database is locked"
TABLE_PREFIX = "huey"  # PostgreSQL queue tables sit beside ours; the schema check skips tables named huey*
POLL_MAX_DELAY_S = 1.0  # an idle worker on a polled storage (SQLite) looks at least this often
ERROR = "error"  # a drain outcome beside jobs' own: the task itself failed (the database was unreachable, say)


class _SqliteStorage(SqliteStorage):  # type: ignore[misc]  # huey ships no type hints
    """Huey's SQLite storage with synchronous=NORMAL, which Huey does not offer (only fsync on or off): in WAL
    mode it survives a crash of any process and spares an fsync on every enqueue and dequeue."""

    def _create_connection(self) -> Any:
        conn = super()._create_connection()
        conn.execute("pragma synchronous=NORMAL")
        return conn

    def read_schedule(self, ts: datetime) -> list[bytes]:
        # Huey takes the write lock to look at the schedule, every second in a running worker; look first, so
        # that an idle worker does not contend with the processes queueing jobs.
        due = "select 1 from schedule where queue = ? and timestamp <= ? limit 1"
        if not self.sql(due, (self.name, ts.timestamp()), results=True):
            return []
        return list(super().read_schedule(ts))


class _PostgresStorage(PostgresStorage):  # type: ignore[misc]
    def initialize_schema(self) -> None:
        # CREATE TABLE IF NOT EXISTS is not safe against itself in PostgreSQL (two first-time processes: one fails
        # on a unique index of pg_type), so skip it once the tables exist and serialize it until then.
        with self.db(commit=True, close=True) as curs:
            curs.execute("select to_regclass(%s)", (self.table_counter,))
            if curs.fetchone()[0] is not None:
                return
            curs.execute("select pg_advisory_xact_lock(hashtext(%s))", ("campaign_manager.queue.schema",))
            for sql in self.ddl:
                curs.execute(sql)


class JobQueue(Huey):  # type: ignore[misc]
    """A Huey instance with cm's task on it, as `run_job_task`."""

    run_job_task: Any


def _queue_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import psycopg

    found: list[type[BaseException]] = [sqlite3.Error, psycopg.Error, OSError]
    try:
        from redis.exceptions import RedisError

        found.append(RedisError)
    except ImportError:
        pass
    return tuple(found)


def _display(url: str) -> str:
    from campaign_manager.config import mask

    return str(mask("queue.url", url))


def get_huey(settings: Settings, *, blocking: bool = True) -> JobQueue:
    """The queue named by `queue.url` and `queue.name`. `blocking=False` makes dequeue return at once when the
    queue is empty (Redis and PostgreSQL otherwise wait up to a second for a message)."""
    url, name = settings.queue_url, str(settings.get("queue.name"))
    kwargs: dict[str, Any]
    if url.startswith(("redis://", "rediss://", "unix://")):
        storage, kwargs = RedisStorage, {"url": url, "blocking": blocking, "read_timeout": 1}
    elif url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        dsn = "postgresql://" + url.split("://", 1)[1]
        storage = _PostgresStorage
        kwargs = {"dsn": dsn, "table_prefix": TABLE_PREFIX, "blocking": blocking, "read_timeout": 1}
    elif "://" not in url or url.startswith("sqlite:"):
        path = sqlite_path(url) if is_sqlite(url) else None
        if path is None:
            raise QueueError(f"queue.url {url!r} is not a file that workers can share", hint="name a SQLite file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueError(f"cannot create the folder for the queue {path}: {exc.strerror}") from None
        storage, kwargs = _SqliteStorage, {"filename": str(path), "timeout": BUSY_TIMEOUT_S}
    else:
        raise QueueError(
            f"unsupported queue.url {_display(url)!r}", hint="use a SQLite path, postgresql:// or redis://"
        )
    try:
        huey = JobQueue(name, results=False, storage_class=storage, **kwargs)
    except ConfigurationError as exc:
        raise QueueError(
            f"cannot use queue {_display(url)}: {exc}", hint="pip install 'campaign-manager[redis]'"
        ) from None
    except _queue_errors() as exc:
        raise QueueError(f"cannot open the queue {_display(url)}: {_first_line(exc)}") from None
    huey.run_job_task = _define_task(huey, settings)
    return huey


def close_huey(huey: JobQueue) -> None:
    huey.storage.close()
    pool = getattr(huey.storage, "pool", None)  # Redis keeps its connections in a pool
    if pool is not None:
        pool.disconnect()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- the task ---------------------------------------------------------------------------------------------------


class _RetryLater(Exception):
    """Raised by the task so that Huey schedules its retry (with backoff); the job row already holds the error."""


class _QuietRetries(logging.Filter):
    """Huey logs every exception a task raises, traceback and all; a retry is already logged by us, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _RetryLater))


logging.getLogger("huey").addFilter(_QuietRetries())
_outcome = threading.local()  # the outcome of the last task this thread ran, for the drain's report


def _define_task(huey: JobQueue, settings: Settings) -> Any:
    url = settings.database_url
    retries = int(settings.get("worker.retries"))
    lease = float(settings.get("worker.lease_seconds"))
    options = {key: settings.get(key) for key in jobs.OPTION_KEYS}

    @huey.task(  # type: ignore[untyped-decorator]  # huey ships no type hints
        retries=retries,
        retry_delay=float(settings.get("worker.retry_delay")),
        retry_backoff=float(settings.get("worker.retry_backoff")),
        context=True,
        name="run_job",
    )
    def run_job_task(job_id: int, task: Any = None) -> str:
        retries_left = int(task.retries) if task is not None else 0
        return _run(url, job_id, retries_left=retries_left, max_attempts=retries + 1, lease=lease, options=options)

    return run_job_task


# A message can arrive before the transaction that saved its job commits (submit_job queues it first, so that a
# command that fails leaves no job behind): wait this long for the job to appear before dropping the message.
NOT_YET_SAVED_S = 5.0


def _run(url: str, job_id: int, *, retries_left: int, max_attempts: int, lease: float, options: dict[str, Any]) -> str:
    _outcome.value = ERROR
    deadline = time.monotonic() + NOT_YET_SAVED_S
    while True:
        try:
            attempt = jobs.attempt_job(
                url,
                job_id,
                worker=jobs.worker_name(),
                retry=retries_left > 0,
                max_attempts=max_attempts,
                lease_seconds=lease,
                on_start=_log_start,
                options=options,
            )
            break
        except NotFound:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            log.warning("job %d does not exist; its queue message is dropped", job_id)
            _outcome.value = jobs.SKIPPED
            return jobs.SKIPPED
    _log_end(attempt)
    _outcome.value = attempt.outcome
    if attempt.outcome == jobs.RETRY:
        raise _RetryLater(attempt.job.error)
    return attempt.outcome


def _fields(job: Any, **more: Any) -> dict[str, Any]:
    return {"fields": {"job_id": job.id, "kind": job.kind, "status": job.status, **more}}


def _log_start(job: Any) -> None:
    log.info("job %d (%s) started, attempt %d", job.id, job.kind, job.attempts, extra=_fields(job))


def _log_end(attempt: jobs.Attempt) -> None:
    job, outcome, secs = attempt.job, attempt.outcome, attempt.seconds
    extra = _fields(job, outcome=outcome, seconds=round(secs, 3))
    if outcome == jobs.DONE:
        counts = ", ".join(f"{k}={v}" for k, v in job.counts.items()) or "no counts"
        log.info("job %d (%s) done in %.1fs: %s", job.id, job.kind, secs, counts, extra=extra)
    elif outcome == jobs.FAILED:
        log.warning("job %d (%s) failed: %s", job.id, job.kind, job.error, extra=extra)
    elif outcome == jobs.RETRY:
        log.warning("job %d (%s) failed, will be retried: %s", job.id, job.kind, job.error, extra=extra)
    elif outcome == jobs.SKIPPED:
        held = f" by {job.worker}" if job.status == "running" else ""
        log.info("job %d (%s) skipped: it is %s%s", job.id, job.kind, job.status, held, extra=extra)
    else:
        log.warning("job %d (%s) %s: it will run again", job.id, job.kind, outcome, extra=extra)


def enqueue_job(settings: Settings, job_id: int, *, huey: JobQueue | None = None) -> None:
    """Put a job's message on the queue; QueueError if the queue cannot take it."""
    own = huey is None
    try:
        if huey is None:
            huey = get_huey(settings, blocking=False)
        _enqueue(huey, job_id)
    finally:
        if own and huey is not None:
            close_huey(huey)


def submit_job(settings: Settings, save: Callable[[Session], Job]) -> Job:
    """Save a job (`save(session)` creates it and stages its input) and queue it, all or nothing: the message goes
    on the queue inside the transaction that saves the job, so a command that reports a failure (the queue is
    down, the disk is full at the commit) leaves no job behind. A message that outruns the commit waits for it
    (NOT_YET_SAVED_S); one whose job never commits is dropped by the worker."""
    from campaign_manager.db import open_session

    with open_session(settings.database_url) as session:
        job = save(session)
        session.flush()
        assert job.id is not None
        enqueue_job(settings, job.id)
    return job


def _enqueue(huey: JobQueue, job_id: int) -> None:
    try:
        huey.run_job_task(job_id)
    except _queue_errors() as exc:
        raise QueueError(f"cannot put job {job_id} on the queue: {_first_line(exc)}") from None


def recover_jobs(settings: Settings, huey: JobQueue) -> jobs.Recovery:
    """Re-queue (or give up on) jobs whose worker stopped renewing their lease."""
    recovery = jobs.recover_stale_jobs(
        settings.database_url,
        enqueue=lambda job_id: _enqueue(huey, job_id),
        max_attempts=int(settings.get("worker.retries")) + 1,
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
    candidates = jobs.queued_jobs(settings.database_url, older_than=ORPHAN_AFTER_S)
    if not candidates:
        return []  # the usual case: no need to read (and unpickle) every message on the queue
    waiting = {task.args[0] for task in [*huey.pending(), *huey.scheduled()] if task.args}
    orphans = [job_id for job_id in candidates if job_id not in waiting]
    for job_id in orphans:
        _enqueue(huey, job_id)
        log.warning("job %d: was queued without a message on the queue; sent one", job_id)
    return orphans


def purge_old_files(settings: Settings) -> None:
    """Purge staged uploads past `jobs.keep_files_days`, if no process did in the last hour."""
    days = float(settings.get("jobs.keep_files_days"))
    try:
        purged = retention.purge_if_due(settings.database_url, older_than_days=days)
    except CmError as exc:
        log.warning("could not purge old staged uploads: %s", exc.message)
        return
    if purged:
        log.info("purged the staged uploads of %d job(s) that ended long ago", len(purged))


def release_jobs(settings: Settings, huey: JobQueue) -> list[int]:
    """Give back the jobs this process is running (a worker stopping before they finish)."""
    released = jobs.release_jobs(settings.database_url, enqueue=lambda job_id: _enqueue(huey, job_id))
    for job_id in released:
        log.warning("job %d released: back in the queue for the next worker", job_id)
    return released


# -- consuming --------------------------------------------------------------------------------------------------


def run_worker(settings: Settings, *, workers: int, grace: float) -> list[int]:
    """Run a Huey consumer until SIGTERM (finish the jobs in hand within `grace` seconds, then release them) or
    SIGINT (release them at once). Returns the ids of the jobs released."""
    huey = get_huey(settings)
    try:
        recover_jobs(settings, huey)
        purge_old_files(settings)
        consumer = huey.create_consumer(
            workers=workers,
            worker_type="thread",
            periodic=False,
            max_delay=POLL_MAX_DELAY_S,
            shutdown_timeout=grace,
            graceful_signal="TERM",
        )
        stopped: threading.Event = consumer.stop_flag
        keeper = threading.Thread(target=_keep_recovering, args=(settings, huey, stopped), daemon=True)
        keeper.start()
        log.info(
            "worker %s started: %d thread(s) on %s, queue %r",
            jobs.worker_name(),
            workers,
            _display(settings.queue_url),
            huey.name,
        )
        consumer.run()
        return release_jobs(settings, huey)
    finally:
        close_huey(huey)
        log.info("worker %s stopped", jobs.worker_name())


def _keep_recovering(settings: Settings, huey: JobQueue, stopped: threading.Event) -> None:
    interval = max(float(settings.get("worker.lease_seconds")) / 2, 1.0)
    while not stopped.wait(interval):
        try:
            recover_jobs(settings, huey)
        except CmError as exc:
            log.warning("could not look for stale jobs: %s", exc.message)
        purge_old_files(settings)


@dataclass
class DrainReport:
    outcomes: dict[int, str] = field(default_factory=dict)  # job id -> outcome of its last attempt in this drain
    recovered: jobs.Recovery = field(default_factory=jobs.Recovery)
    released: list[int] = field(default_factory=list)
    waiting: list[tuple[int, datetime | None]] = field(default_factory=list)  # retries not due yet: (job, UTC eta)

    def ids(self, *outcomes: str) -> list[int]:
        return sorted(job_id for job_id, outcome in self.outcomes.items() if outcome in outcomes)

    @property
    def ok(self) -> bool:
        """Every job this drain ran succeeded (a job skipped because someone else had it is not a failure)."""
        return not self.ids(jobs.FAILED, jobs.RETRY, ERROR)


def drain(settings: Settings, *, workers: int = 1, grace: float = 30.0) -> DrainReport:
    """Recover stale jobs, move retries that have come due onto the queue, and run everything until the queue is
    empty; retries not yet due stay in the schedule. In the main thread, SIGTERM stops taking jobs and lets the
    running ones finish within `grace` seconds (then releases them); SIGINT releases them at once."""
    huey = get_huey(settings, blocking=False)
    report, lock, stop = DrainReport(), threading.Lock(), threading.Event()
    try:
        report.recovered = recover_jobs(settings, huey)
        purge_old_files(settings)
        threads = [
            threading.Thread(target=_drain_loop, args=(huey, stop, report, lock), name=f"drain-{i}", daemon=True)
            for i in range(max(workers, 1))
        ]
        with _signals() as shutdown:
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
        report.waiting = [(t.args[0] if t.args else -1, t.eta) for t in huey.scheduled()]
        return report
    finally:
        close_huey(huey)


def _drain_loop(huey: JobQueue, stop: threading.Event, report: DrainReport, lock: threading.Lock) -> None:
    while not stop.is_set():
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
        except _queue_errors() as exc:
            log.error("cannot read the queue: %s", _first_line(exc))
            stop.set()
            return
        try:
            task = huey.deserialize_task(data)
        except Exception:
            log.exception("dropped a queue message that cannot be read")
            continue
        _outcome.value = None  # stays None unless the task runs (Huey re-schedules a task whose time has not come)
        try:
            huey.execute(task)
        except _queue_errors() as exc:
            log.error("job %s: the queue failed around it: %s", task.args[0] if task.args else "?", _first_line(exc))
        if task.args and _outcome.value is not None:
            with lock:
                report.outcomes[int(task.args[0])] = _outcome.value


@dataclass
class _Shutdown:
    requested: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)

    def handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT or self.requested.is_set():
            self.now.set()
        self.requested.set()


@contextmanager
def _signals() -> Iterator[_Shutdown]:
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


def configure_logging(*, verbose: bool, quiet: bool) -> None:
    """Job start/end lines at INFO unless --quiet; Huey's own warnings through the same handler as ours."""
    ours = logging.getLogger("campaign_manager")
    log.setLevel(logging.NOTSET if quiet or ours.getEffectiveLevel() <= logging.INFO else logging.INFO)
    theirs = logging.getLogger("huey")
    theirs.handlers[:] = ours.handlers
    theirs.propagate = False
    theirs.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
