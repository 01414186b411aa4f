"""The Huey queue: its storage (from `queue.url`: a SQLite file, PostgreSQL or Redis), and putting a job's message
on it. The queue only carries job ids. What a job is and how it ended lives in the job row (`records`), which is
also what makes consuming safe: a message is only a hint to run a job, and the job's atomic claim decides whether
this worker runs it. A message that arrives twice, late, or for a cancelled job does nothing. The task that runs
a message is in `tasks`; `cm worker --drain` is `drain`, the long-running worker `consumer`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from huey import Huey
from huey.exceptions import ConfigurationError
from huey.storage import PostgresStorage, RedisStorage, SqliteStorage

from campaign_manager import db
from campaign_manager.config import mask
from campaign_manager.errors import QueueError
from campaign_manager.files import create_private
from campaign_manager.jobs.health import Health, first_line
from campaign_manager.jobs.tasks import DrainOutcome, define_task

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.config import Settings
    from campaign_manager.tables.jobs import Job

log = logging.getLogger("campaign_manager.worker")

BUSY_TIMEOUT_S = 30.0  # SQLite queue: how long a writer waits for another before "database is locked"
TABLE_PREFIX = "huey"  # PostgreSQL queue tables sit beside ours; the schema check skips tables named huey*
POLL_MAX_DELAY_S = 1.0  # an idle worker on a polled storage (SQLite) looks at least this often


class QueueUnreachable(QueueError):
    """The queue's server (or file) cannot be reached: worth trying again later, unlike a queue.url cm cannot use."""


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
            curs.execute("select pg_advisory_xact_lock(hashtext(%s))", ("campaign_manager.jobs.queue.schema",))
            for sql in self.ddl:
                curs.execute(sql)


class JobQueue(Huey):  # type: ignore[misc]
    """A Huey instance with cm's task on it, as `run_job_task`, and the faults its consumers share."""

    run_job_task: Any
    health: Health
    display_url: str
    outcomes: dict[str, DrainOutcome] | None = None  # message id -> what its task came to, while a drain collects


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
    return str(mask("queue.url", url))


def get_huey(settings: Settings, *, blocking: bool = True) -> JobQueue:
    """The queue named by `queue.url` and `queue.name`. `blocking=False` makes dequeue return at once when the
    queue is empty (Redis and PostgreSQL otherwise wait up to a second for a message)."""
    url, name = settings.queue.url, settings.queue.name
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
        raise unreachable(url, exc) from None
    huey.health, huey.display_url = Health(), _display(url)
    huey.run_job_task = define_task(huey, settings)
    return huey


def unreachable(url: str, exc: BaseException) -> QueueUnreachable:
    """`url` may be masked already: masking twice changes nothing."""
    return QueueUnreachable(f"cannot reach the queue {_display(url)}: {first_line(exc)}")


def probe(huey: JobQueue) -> None:
    """QueueUnreachable unless the queue answers (one cheap round trip)."""
    try:
        huey.storage.queue_size()
    except queue_errors() as exc:
        raise unreachable(huey.display_url, exc) from None


def close_huey(huey: JobQueue) -> None:
    huey.storage.close()
    pool = getattr(huey.storage, "pool", None)  # Redis keeps its connections in a pool
    if pool is not None:
        pool.disconnect()


def enqueue_job(settings: Settings, job_id: int, *, huey: JobQueue | None = None, eta: datetime | None = None) -> None:
    """Put a job's message on the queue (to run at `eta`, if given); QueueError if the queue cannot take it."""
    own = huey is None
    try:
        if huey is None:
            huey = get_huey(settings, blocking=False)
        send_message(huey, job_id, eta=eta)
    finally:
        if own and huey is not None:
            close_huey(huey)


def submit_job(
    settings: Settings, save: Callable[[Session], Job], *, eta: Callable[[Session], datetime | None] | None = None
) -> Job:
    """Save a job (`save(session)` creates it and stages its input) and queue it, all or nothing: the message goes
    on the queue inside the transaction that saves the job, so a command that reports a failure (the queue is
    down, the disk is full at the commit) leaves no job behind. A message that outruns the commit waits for it
    (NOT_YET_SAVED_S); one whose job never commits is dropped by the worker."""
    with db.settings_session(settings) as session:
        job = save(session)
        session.flush()
        assert job.id is not None
        enqueue_job(settings, job.id, eta=None if eta is None else eta(session))
    return job


def send_message(huey: JobQueue, job_id: int, *, eta: datetime | None = None) -> None:
    try:
        if eta is None:
            huey.run_job_task(job_id)
        else:
            # Huey compares etas with its own clock, naive UTC (utc=True, its default).
            huey.run_job_task.schedule(args=(job_id,), eta=eta.astimezone(UTC).replace(tzinfo=None))
    except queue_errors() as exc:
        raise QueueError(f"cannot put job {job_id} on the queue: {first_line(exc)}") from None
