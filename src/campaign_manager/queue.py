"""The Huey queue: its storage (from `queue.url`), cm's one task, and the drain (`cm worker --drain`); the
long-running worker is in consumer.py.

The queue only carries job ids. What a job is and how it ended lives in the job row (services/jobs.py), which
is also what makes consuming safe: a message is only a hint to run a job, and the job's atomic claim decides
whether this worker runs it. A message that arrives twice, late, or for a cancelled job does nothing.

Faults around a job are not the job's: a database that cannot be written or reached gets the job handed back
(its attempt not counted) and the message sent again after a delay that grows while the fault lasts; a SQLite
file deleted or replaced under the worker stops it.
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
from huey.exceptions import ConfigurationError, RetryTask
from huey.storage import PostgresStorage, RedisStorage, SqliteStorage

from campaign_manager import db
from campaign_manager.errors import CmError, DatabaseError, NotFound, QueueError
from campaign_manager.files import create_private
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
FIRST_RETRY_S, MAX_RETRY_S = 1.0, 60.0  # a fault (queue or database unreachable): wait 1 s, doubling up to 60 s


class QueueUnreachable(QueueError):
    """The queue's server (or file) cannot be reached: worth trying again later, unlike a queue.url cm cannot use."""


class Outage:
    """A fault the threads of one worker share (the queue, or the database, cannot be reached): one log line an
    attempt, attempts spaced by a delay that doubles from FIRST_RETRY_S to MAX_RETRY_S, cleared by a success.
    Threads that fail during one round add nothing: the round was logged and counted once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.delay = 0.0  # 0: no fault
        self._next_try = 0.0  # time.monotonic() of the next attempt

    def failed(self, line: str | None) -> float:
        """Note a failed attempt and log `line` (None: the caller has said it already) with the delay; returns
        the seconds to wait before the next attempt."""
        with self._lock:
            now = time.monotonic()
            if self.delay and now < self._next_try:
                return self._next_try - now
            self.delay = min(max(self.delay * 2, FIRST_RETRY_S), MAX_RETRY_S)
            self._next_try = now + self.delay
            if line is not None:
                log.warning("%s (trying again in %s s)", line, f"{self.delay:g}")
            return self.delay

    def succeeded(self, line: str | None = None) -> None:
        with self._lock:
            if self.delay and line is not None:
                log.info("%s", line)
            self.delay = 0.0

    def wait_turn(self, stop: threading.Event) -> bool:
        """Wait until the next attempt is due (at once if there is no fault); False if `stop` was set."""
        with self._lock:
            remaining = self._next_try - time.monotonic() if self.delay else 0.0
        return not (stop.wait(remaining) if remaining > 0 else stop.is_set())


@dataclass
class Health:
    """What the threads of one worker (or drain) share about the faults around them."""

    queue: Outage = field(default_factory=Outage)
    database: Outage = field(default_factory=Outage)
    stop: threading.Event = field(default_factory=threading.Event)  # the consumer's stop flag, once it runs
    fatal: DatabaseError | None = None  # why the worker must stop (its database file was deleted or replaced)
    fault: DatabaseError | None = None  # the last time the database could not be written or reached

    def stop_for(self, exc: DatabaseError) -> None:
        """Stop the worker (the CLI then prints `exc`, once)."""
        self.fatal = self.fatal or exc
        self.stop.set()


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
    """A Huey instance with cm's task on it, as `run_job_task`, and the faults its consumers share."""

    run_job_task: Any
    health: Health
    display_url: str


def queue_errors() -> tuple[type[BaseException], ...]:
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
        path = db.sqlite_path(url) if db.is_sqlite(url) else None
        if path is None:
            raise QueueError(f"queue.url {url!r} is not a file that workers can share", hint="name a SQLite file")
        if not path.parent.is_dir():  # beside the database, or a folder someone named: never made here
            raise QueueError(f"cannot open the queue {path}: the folder {path.parent} does not exist")
        try:
            create_private(path)  # 0600 before SQLite makes it (and its -wal and -shm files, which copy its mode)
        except OSError as exc:
            raise QueueError(f"cannot open the queue {path}: {exc.strerror}") from None
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
    except queue_errors() as exc:
        raise _unreachable(url, exc) from None
    huey.health, huey.display_url = Health(), _display(url)
    huey.run_job_task = _define_task(huey, settings)
    return huey


def _unreachable(url: str, exc: BaseException) -> QueueUnreachable:
    """`url` may be masked already: masking twice changes nothing."""
    return QueueUnreachable(f"cannot reach the queue {_display(url)}: {first_line(exc)}")


def probe(huey: JobQueue) -> None:
    """QueueUnreachable unless the queue answers (one cheap round trip)."""
    try:
        huey.storage.queue_size()
    except queue_errors() as exc:
        raise _unreachable(huey.display_url, exc) from None


def close_huey(huey: JobQueue) -> None:
    huey.storage.close()
    pool = getattr(huey.storage, "pool", None)  # Redis keeps its connections in a pool
    if pool is not None:
        pool.disconnect()


def first_line(exc: BaseException) -> str:
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
        return _run(
            huey.health,
            url,
            job_id,
            retries_left=retries_left,
            max_attempts=retries + 1,
            lease=lease,
            options=options,
        )

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
    options: dict[str, Any],
) -> str:
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
        except db.DatabaseGone as exc:
            health.stop_for(exc)
            return ERROR
        except Exception as exc:
            if not db.is_unavailable(exc):
                raise
            # Nothing was claimed (or the job already ended): only the message needs sending again, later.
            health.fault = exc if isinstance(exc, DatabaseError) else db.DatabaseUnavailable(first_line(exc))
            line = f"job {job_id}: the database cannot be written or reached ({first_line(exc)})"
            raise RetryTask(delay=health.database.failed(line)) from None
    if attempt.outcome == jobs.FAULT:
        # Logged by attempt_job, and handed back: run it again once the delay is over (Huey's retry that does
        # not count: RetryTask leaves the task's retries as they were).
        reason = f"the database cannot be written or reached ({attempt.job.error})"
        health.fault = db.DatabaseUnavailable(f"{reason}; job {job_id} goes back to the queue")
        raise RetryTask(delay=health.database.failed(None))
    health.database.succeeded()
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
    with db.open_session(settings.database_url, create=settings.database_is_default) as session:
        job = save(session)
        session.flush()
        assert job.id is not None
        enqueue_job(settings, job.id)
    return job


def _enqueue(huey: JobQueue, job_id: int) -> None:
    try:
        huey.run_job_task(job_id)
    except queue_errors() as exc:
        raise QueueError(f"cannot put job {job_id} on the queue: {first_line(exc)}") from None


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
    try:
        waiting = {task.args[0] for task in [*huey.pending(), *huey.scheduled()] if task.args}
    except queue_errors() as exc:
        raise _unreachable(huey.display_url, exc) from None
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
    except db.DatabaseGone:
        raise  # fatal for the worker: its caller stops
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


# -- draining ---------------------------------------------------------------------------------------------------


@dataclass
class DrainReport:
    outcomes: dict[int, str] = field(default_factory=dict)  # job id -> outcome of its last attempt in this drain
    recovered: jobs.Recovery = field(default_factory=jobs.Recovery)
    released: list[int] = field(default_factory=list)
    waiting: list[tuple[int, datetime | None]] = field(default_factory=list)  # retries not due yet: (job, UTC eta)
    # Why the drain stopped early: the queue or the database could not be reached (the CLI exits 8 or 6).
    queue_error: QueueError | None = None
    database_error: DatabaseError | None = None

    def ids(self, *outcomes: str) -> list[int]:
        return sorted(job_id for job_id, outcome in self.outcomes.items() if outcome in outcomes)

    @property
    def ok(self) -> bool:
        """Every job this drain ran succeeded (a job skipped because someone else had it is not a failure)."""
        return not self.ids(jobs.FAILED, jobs.RETRY, ERROR)


def drain(settings: Settings, *, workers: int = 1, grace: float = 30.0) -> DrainReport:
    """Recover stale jobs, move retries that have come due onto the queue, and run everything until the queue is
    empty; retries not yet due stay in the schedule. In the main thread, SIGTERM stops taking jobs and lets the
    running ones finish within `grace` seconds (then releases them); SIGINT releases them at once.

    Raises DatabaseError (a database that does not exist or cannot be opened) or QueueUnreachable before it
    starts; a fault after that stops it, and the report says why (`queue_error`, `database_error`)."""
    db.ensure_schema(settings.database_url, create=settings.database_is_default)
    huey = get_huey(settings, blocking=False)
    report, lock, stop = DrainReport(), threading.Lock(), huey.health.stop
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
            report.queue_error = report.queue_error or _unreachable(settings.queue_url, exc)
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
                report.queue_error = report.queue_error or _unreachable(huey.display_url, exc)
            health.stop.set()
            return
        try:
            task = huey.deserialize_task(data)
        except Exception:
            log.exception("dropped a queue message that cannot be read")
            continue
        _outcome.value = None  # stays None unless the task runs (Huey re-schedules a task whose time has not come)
        try:
            huey.execute(task)
        except queue_errors() as exc:
            # The job ran (or not), but its retry or its next step could not be put on the queue.
            with lock:
                report.queue_error = report.queue_error or _unreachable(huey.display_url, exc)
            health.stop.set()
        if task.args and _outcome.value is not None:
            with lock:
                report.outcomes[int(task.args[0])] = _outcome.value
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


def configure_logging(*, verbose: bool, quiet: bool) -> None:
    """Job start/end lines at INFO unless --quiet; Huey's own warnings through the same handler as ours."""
    ours = logging.getLogger("campaign_manager")
    log.setLevel(logging.NOTSET if quiet or ours.getEffectiveLevel() <= logging.INFO else logging.INFO)
    theirs = logging.getLogger("huey")
    theirs.handlers[:] = ours.handlers
    theirs.propagate = False
    theirs.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
