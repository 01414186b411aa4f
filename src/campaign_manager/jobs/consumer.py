"""The long-running worker (`cm worker`): Huey's consumer, with cm's handling of what fails around it.

Huey's own consumer logs a traceback on every failed read of the queue and tries again within a second, for
ever: a Redis server that is down fills the log at ~150 lines a second. Here a queue that cannot be reached, at
start or later, is logged in one line an attempt and tried again after a delay that doubles up to a minute
(queue.Outage); so is a database that cannot be written (the job is handed back, see queue._run). A SQLite
database file deleted or replaced under the worker stops it (DatabaseGone), rather than letting it write into
whatever is at that path now.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from huey.consumer import Consumer, Scheduler, Worker

from campaign_manager import db
from campaign_manager.errors import CmError
from campaign_manager.jobs import runner
from campaign_manager.jobs.drain import purge_old_files, recover_jobs, release_jobs, stop_signals
from campaign_manager.jobs.health import Outage, first_line
from campaign_manager.jobs.queue import (
    POLL_MAX_DELAY_S,
    JobQueue,
    QueueUnreachable,
    close_huey,
    get_huey,
    log,
    probe,
    queue_errors,
)

if TYPE_CHECKING:
    from campaign_manager.config import Settings

WATCH_INTERVAL_S = 1.0  # how often a worker checks that its SQLite file is still the one it opened


class _Worker(Worker):  # type: ignore[misc]  # huey ships no type hints
    """Huey's worker thread, minus its traceback on every failed dequeue, waiting out queue and database faults."""

    huey: JobQueue

    def loop(self, now: Any = None) -> None:
        health = self.huey.health
        if not (health.queue.wait_turn(self.stop_flag) and health.database.wait_turn(self.stop_flag)):
            return
        try:
            task = self.huey.dequeue()
        except queue_errors() as exc:
            health.queue.failed(f"cannot reach the queue {self.huey.display_url}: {first_line(exc)}")
            return
        except Exception as exc:  # a message that cannot be unpickled: dropped (dequeue took it off the queue)
            log.error("dropped a queue message that cannot be read: %s", first_line(exc))
            return
        health.queue.succeeded(f"the queue {self.huey.display_url} answers again")
        if task is None:
            if not self.huey.storage.blocking:
                self.sleep()  # Huey's polling backoff, for storages that cannot block (SQLite)
            return
        self.delay = self.default_delay
        try:
            self.huey.execute(task, now)
        except queue_errors() as exc:
            # The task ran (or was put off), but its retry could not be queued: the job is found again by the
            # orphan check (queue._requeue_orphans) once the queue is back.
            health.queue.failed(f"cannot reach the queue {self.huey.display_url}: {first_line(exc)}")
        except Exception:
            log.exception("unexpected error around the task of job %s", task.args[0] if task.args else "?")


class _Scheduler(Scheduler):  # type: ignore[misc]
    """Moves retries that have come due onto the queue, every second, or at the queue's pace while it is down."""

    huey: JobQueue

    def loop(self, now: Any = None) -> None:
        start, health = time.monotonic(), self.huey.health
        if health.queue.wait_turn(self.stop_flag):
            try:
                for task in self.huey.read_schedule(now):
                    self.huey.enqueue(task)
            except queue_errors() as exc:
                health.queue.failed(f"cannot reach the queue {self.huey.display_url}: {first_line(exc)}")
        self.sleep_for_interval(start, self.interval)


class _Consumer(Consumer):  # type: ignore[misc]
    worker_class = _Worker
    scheduler_class = _Scheduler


def run_worker(settings: Settings, *, workers: int, grace: float) -> list[int]:
    """Run jobs until SIGTERM (finish the jobs in hand within `grace` seconds, then release them) or SIGINT
    (release them at once). Returns the ids of the jobs released. Raises DatabaseError if the database does not
    exist (or cannot be opened) at the start, or its file is deleted or replaced while the worker runs."""
    db.ensure_schema(settings.database_url, create=settings.database_is_default)
    huey = _open_queue(settings)
    if huey is None:
        return []  # stopped while waiting for the queue
    try:
        consumer = _Consumer(
            huey,
            workers=workers,
            worker_type="thread",
            periodic=False,
            max_delay=POLL_MAX_DELAY_S,
            shutdown_timeout=grace,
            graceful_signal="TERM",
        )
        huey.health.stop = consumer.stop_flag  # a fatal error anywhere stops the consumer
        watch = threading.Thread(target=_keep_watch, args=(settings, huey), name="watch", daemon=True)
        watch.start()
        name = runner.worker_name()
        log.info("worker %s started: %d thread(s) on %s, queue %r", name, workers, huey.display_url, huey.name)
        consumer.run()
        if huey.health.fatal is not None:
            raise huey.health.fatal
        return release_jobs(settings, huey)
    finally:
        close_huey(huey)
        log.info("worker %s stopped", runner.worker_name())


def _open_queue(settings: Settings) -> JobQueue | None:
    """The queue, once it answers: until then one line an attempt, attempts spaced as queue.Outage says. None if
    SIGTERM or SIGINT came first. A queue.url cm cannot use at all (QueueError) is raised at once."""
    opening = Outage()
    with stop_signals() as shutdown:
        while True:
            huey = None
            try:
                huey = get_huey(settings)
                probe(huey)
                return huey
            except QueueUnreachable as exc:
                if huey is not None:
                    close_huey(huey)
                delay = opening.failed(exc.message)
            if shutdown.requested.wait(delay):
                return None


def _keep_watch(settings: Settings, huey: JobQueue) -> None:
    """Every second: is the database file still the one the worker opened? Every half lease (and at once): put
    back on the queue the jobs whose worker stopped renewing their lease, and purge old staged uploads (at most
    hourly, see retention)."""
    url, health = settings.database_url, huey.health
    every = max(settings.worker.lease_seconds / 2, WATCH_INTERVAL_S)
    next_recovery = time.monotonic()
    while not health.stop.is_set():
        try:
            db.check_database(url)
            if time.monotonic() >= next_recovery:
                next_recovery = time.monotonic() + every
                recover_jobs(settings, huey)
                purge_old_files(settings)
        except db.DatabaseGone as exc:
            health.stop_for(exc)
            return
        except CmError as exc:
            log.warning("could not look for stale jobs: %s", exc.message)
        health.stop.wait(WATCH_INTERVAL_S)
