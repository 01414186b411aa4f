"""The queue on each backend (a SQLite file, PostgreSQL, Redis), drained by the real drain code."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from campaign_manager import db
from campaign_manager.audience import groups
from campaign_manager.config import load_settings
from campaign_manager.errors import Conflict, QueueError
from campaign_manager.jobs import drain, queue, records, runner, tasks
from campaign_manager.models import Job, utcnow
from conftest import assert_error, make_cm
from queue_helpers import QueueSetup, queue_setup


def drain_until_settled(qs: QueueSetup, job_id: int, *, drains: int = 200) -> list[drain.DrainReport]:
    """Drain until the job is done or failed (retries come due between drains)."""
    reports = []
    for _ in range(drains):
        reports.append(drain.drain(qs.settings()))
        if qs.job(job_id).status in ("done", "failed"):
            return reports
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never settled: {qs.job(job_id)}")


def test_queue_drain_done(qs: QueueSetup) -> None:
    job_id = qs.queue("test-ok", n=7)
    assert qs.job(job_id).status == "queued"
    assert qs.huey().pending_count() == 1

    report = drain.drain(qs.settings())

    assert report.ok and report.outcomes == {job_id: "done"}
    job = qs.job(job_id)
    assert (job.status, job.counts, job.attempts, job.error) == ("done", {"read": 7, "created": 1}, 1, None)
    assert job.finished_at is not None and job.worker == runner.worker_name()
    assert qs.huey().pending_count() == 0 and qs.runs(job_id) == 1
    assert drain.drain(qs.settings()).outcomes == {}


def fast_forward(qs: QueueSetup) -> None:
    """Move every scheduled retry onto the queue now, as if its time had come."""
    huey = qs.huey()
    for task in huey.read_schedule(datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)):
        task.eta = None
        huey.enqueue(task)


def test_failing_job_is_retried_with_backoff_then_failed(qs: QueueSetup) -> None:
    qs.options.update({"worker.retry_delay": 600.0, "worker.retry_backoff": 3.0})
    job_id = qs.queue("test-fail", reason="the SMTP server said no")

    first = drain.drain(qs.settings())

    assert first.outcomes == {job_id: "retry"} and not first.ok
    assert [waiting for waiting, _eta in first.waiting] == [job_id]
    job = qs.job(job_id)
    assert (job.status, job.attempts, job.error) == ("queued", 1, "RuntimeError: the SMTP server said no")
    [retry] = qs.huey().scheduled()
    # This retry waits retry_delay; the one after it will wait retry_backoff times longer.
    assert (retry.args, retry.retries, retry.retry_delay) == ((job_id,), 1, pytest.approx(1800.0))
    assert drain.drain(qs.settings()).outcomes == {}  # not due yet: left alone

    fast_forward(qs)
    second = drain.drain(qs.settings())
    assert second.outcomes == {job_id: "retry"} and qs.job(job_id).attempts == 2
    [retry] = qs.huey().scheduled()
    assert (retry.retries, retry.retry_delay) == (0, pytest.approx(5400.0))

    fast_forward(qs)
    last = drain.drain(qs.settings())
    job = qs.job(job_id)
    assert job.status == "failed" and job.attempts == 3 and qs.runs(job_id) == 3
    assert job.error == "RuntimeError: the SMTP server said no (after 3 attempts)"
    assert job.finished_at is not None
    assert last.outcomes == {job_id: "failed"} and not last.ok and last.waiting == []
    assert qs.huey().scheduled_count() == 0 and qs.huey().pending_count() == 0


def test_transient_failure_then_success(qs: QueueSetup) -> None:
    job_id = qs.queue("test-flaky", fail_times=1)
    reports = drain_until_settled(qs, job_id)
    job = qs.job(job_id)
    assert (job.status, job.attempts, job.error, job.counts) == ("done", 2, None, {"read": 1})
    assert reports[-1].ok


def test_cm_error_fails_at_once(qs: QueueSetup) -> None:
    job_id = qs.queue("test-refuse", reason="no email column in people.csv")
    report = drain.drain(qs.settings())
    job = qs.job(job_id)
    assert (job.status, job.attempts, job.error) == ("failed", 1, "no email column in people.csv")
    assert report.outcomes == {job_id: "failed"} and qs.runs(job_id) == 1
    assert qs.huey().scheduled_count() == 0


def test_cancel_queued_job(qs: QueueSetup) -> None:
    job_id = qs.queue("test-ok")
    with db.open_session(qs.db_url) as session:
        assert records.cancel_job(session, job_id).status == "cancelled"

    report = drain.drain(qs.settings())

    assert report.outcomes == {job_id: "skipped"} and report.ok
    assert qs.job(job_id).status == "cancelled" and qs.runs(job_id) == 0
    with db.open_session(qs.db_url) as session, pytest.raises(Conflict, match="is cancelled"):
        records.cancel_job(session, job_id)


@pytest.mark.parametrize("status", ["running", "done", "failed"])
def test_cannot_cancel_a_started_job(qs_sqlite: QueueSetup, status: str) -> None:
    job_id = qs_sqlite.queue("test-ok", enqueue=False)
    with db.open_session(qs_sqlite.db_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status
    with db.open_session(qs_sqlite.db_url) as session, pytest.raises(Conflict, match=f"job {job_id} is {status}"):
        records.cancel_job(session, job_id)
    assert qs_sqlite.job(job_id).status == status


def test_overlapping_drains_in_threads_never_run_a_job_twice(qs: QueueSetup) -> None:
    ids = [qs.queue("test-ok", sleep=0.005) for _ in range(24)]
    reports: list[drain.DrainReport] = []

    def run() -> None:
        reports.append(drain.drain(qs.settings(), workers=2))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [qs.runs(job_id) for job_id in ids] == [1] * len(ids)
    assert {qs.job(job_id).status for job_id in ids} == {"done"}
    assert all(report.ok for report in reports)
    done = [job_id for report in reports for job_id, outcome in report.outcomes.items() if outcome == "done"]
    assert sorted(done) == ids


def _die_while_running(qs: QueueSetup, job_id: int, *, attempts: int = 1) -> None:
    """What a worker that died mid-job leaves: its message taken, the job running, the lease run out."""
    assert qs.huey().storage.dequeue() is not None
    with db.open_session(qs.db_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.attempts, job.worker = "running", attempts, "gone-host:4242"
        job.started_at, job.lease_until = utcnow() - timedelta(minutes=5), utcnow() - timedelta(minutes=4)


def test_job_of_a_dead_worker_is_run_again_and_converges(qs: QueueSetup) -> None:
    job_id = qs.queue("test-ok", n=3)
    _die_while_running(qs, job_id)

    report = drain.drain(qs.settings())

    assert report.recovered.requeued == [job_id] and report.outcomes == {job_id: "done"}
    job = qs.job(job_id)
    assert (job.status, job.attempts, job.counts) == ("done", 2, {"read": 3, "created": 1})
    assert qs.runs(job_id) == 1
    # A late duplicate message changes nothing: the claim refuses a done job.
    queue.enqueue_job(qs.settings(), job_id)
    assert drain.drain(qs.settings()).outcomes == {job_id: "skipped"}
    assert qs.runs(job_id) == 1
    with db.open_session(qs.db_url, write=False) as session:
        assert [g.name for g in groups.list_groups(session)] == [f"job-{job_id}"]


def test_job_that_keeps_killing_its_worker_is_given_up(qs: QueueSetup) -> None:
    job_id = qs.queue("test-ok")
    _die_while_running(qs, job_id, attempts=3)  # retries=2: three claims is the limit
    report = drain.drain(qs.settings())
    job = qs.job(job_id)
    assert report.recovered.failed == [job_id] and job.status == "failed"
    assert job.error is not None and "gone-host:4242" in job.error and qs.runs(job_id) == 0


def test_unknown_job_id_on_the_queue_is_dropped(qs: QueueSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "NOT_YET_SAVED_S", 0.5)  # how long a message waits for its job's commit
    queue.enqueue_job(qs.settings(), 999)
    report = drain.drain(qs.settings())
    assert report.outcomes == {999: "skipped"} and qs.huey().pending_count() == 0


def test_sqlite_queue_pragmas(qs_sqlite: QueueSetup) -> None:
    settings = qs_sqlite.settings()
    assert settings.queue_url.endswith("/cm-queue.db")
    huey = qs_sqlite.huey()
    conn = huey.storage.conn
    assert conn.execute("pragma busy_timeout").fetchone()[0] >= 5000
    assert conn.execute("pragma synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    path = Path(settings.queue_url.removeprefix("sqlite:///"))
    assert path.exists() and sqlite3.connect(path).execute("pragma journal_mode").fetchone()[0] == "wal"


@pytest.fixture
def qs_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueSetup]:
    yield from queue_setup(request, "postgres", tmp_path)


@pytest.mark.postgres
def test_postgres_queue_tables_sit_beside_ours(qs_postgres: QueueSetup) -> None:
    from sqlalchemy import inspect

    qs_postgres.queue("test-ok")
    with db.get_engine(qs_postgres.db_url).connect() as conn:
        names = set(inspect(conn).get_table_names())
    assert {"huey_task", "huey_schedule", "huey_kv", "huey_counter", "job"} <= names
    db._checked.clear()
    db.ensure_schema(qs_postgres.db_url)  # the schema check is not confused by the queue's tables


@pytest.mark.parametrize(
    ("url", "message"),
    [("ftp://example.com/q", "unsupported queue.url"), ("sqlite:///:memory:", "not a file")],
)
def test_bad_queue_url(tmp_path: Path, url: str, message: str) -> None:
    settings = load_settings(None, {"database.url": f"sqlite:///{tmp_path / 'cm.db'}", "queue.url": url})
    with pytest.raises(QueueError, match=message):
        queue.get_huey(settings)


def test_a_job_the_queue_cannot_take_is_not_left_behind(
    qs_sqlite: QueueSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message goes on the queue inside the transaction that saves the job: a queue that cannot take it rolls
    the job back, so the command's failure (exit 8) leaves nothing for a later drain to run."""
    settings = load_settings(None, {"database.url": qs_sqlite.db_url, "queue.url": "redis://127.0.0.1:1/0"})
    with pytest.raises(QueueError, match="cannot put job 1 on the queue"):
        queue.submit_job(settings, lambda session: records.create_job(session, "test-ok", {"log": "x"}))
    cm = make_cm(qs_sqlite.db_url)
    cm("group create news")
    monkeypatch.setenv("CM_QUEUE_URL", "redis://127.0.0.1:1/0")
    path = tmp_path / "people.csv"
    path.write_text("email\nada@example.com\n")
    run = cm(["group", "add-recipients", "news", "--csv", str(path)], ok=False)
    assert_error(run, 8, "cannot put job")
    assert cm("jobs list --json").json() == []


def test_a_queued_job_whose_message_was_lost_is_sent_again(qs: QueueSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cm` died between committing the job and queueing its message: the next drain finds and runs the job."""
    qs.options.update({"worker.retry_delay": 600.0})
    job_id = qs.queue("test-ok", enqueue=False)
    retried = qs.queue("test-fail", reason="later")
    drain.drain(qs.settings())  # `retried` now waits in the schedule
    assert qs.job(job_id).status == "queued" and qs.job(retried).status == "queued"
    monkeypatch.setattr(drain, "ORPHAN_AFTER_S", 0.0)

    report = drain.drain(qs.settings())

    assert report.recovered.orphaned == [job_id] and report.outcomes == {job_id: "done"}
    assert qs.job(job_id).status == "done" and qs.runs(job_id) == 1
    assert qs.job(retried).status == "queued"  # its retry is scheduled: not an orphan
