"""The job table: the `cm jobs` commands, and the claim/heartbeat/release rules of jobs/runner.py and jobs/leases.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from campaign_manager import db
from campaign_manager.errors import CmError, InvalidInput, NotFound
from campaign_manager.jobs import leases, records, runner
from campaign_manager.models import Job, utcnow
from conftest import Run
from queue_helpers import register_kinds, unregister_kinds


@pytest.fixture(autouse=True)
def _kinds() -> Iterator[None]:
    register_kinds()
    yield
    unregister_kinds()


def make_job(url: str, kind: str = "test-ok", **values: Any) -> int:
    with db.open_session(url) as session:
        job = records.create_job(session, kind, {"log": "/dev/null"})
        for key, value in values.items():
            setattr(job, key, value)
        return int(job.id or 0)


def read_job(url: str, job_id: int) -> Job:
    with db.open_session(url, write=False) as session:
        return records.get_job(session, job_id)


# -- `cm jobs` --------------------------------------------------------------------------------------------------


def test_jobs_list_show_cancel(db_url: str, cm: Callable[..., Run]) -> None:
    counts = {"read": 10, "created": 7, "updated": 0, "invalid": 1}
    done = make_job(db_url, status="done", counts=counts, finished_at=utcnow())
    queued = make_job(db_url)

    listed = cm("jobs list --json").json()
    assert [job["id"] for job in listed] == [queued, done]  # newest first
    assert set(listed[0]) >= {"id", "kind", "status", "created_at", "finished_at", "error", "counts", "attempts"}
    assert [job["id"] for job in cm("jobs list --status done --json").json()] == [done]
    table = cm("jobs list").stdout
    assert "summary" in table and "created 7" in table and "updated" not in table  # zero counts are left out

    shown = cm(f"jobs show {done} --json").json()
    assert shown["counts"] == counts and shown["status"] == "done"
    text = cm(f"jobs show {done}").stdout
    assert "rows read" in text and "invalid" in text and "status: done" in text

    assert cm(f"jobs cancel {queued} --json").json()["status"] == "cancelled"
    assert cm(f"jobs show {queued} --json").json()["finished_at"] is not None


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ("jobs show 999", 3, "no job 999"),
        ("jobs cancel 999", 3, "no job 999"),
        ("jobs list --status lost", 2, "unknown job status 'lost'"),
    ],
)
def test_jobs_errors(cm: Callable[..., Run], args: str, code: int, message: str) -> None:
    run = cm(args, ok=False)
    assert run.exit_code == code and message in run.stderr


def test_cannot_cancel_a_finished_job(db_url: str, cm: Callable[..., Run]) -> None:
    job_id = make_job(db_url, status="done")
    run = cm(f"jobs cancel {job_id}", ok=False)
    assert run.exit_code == 4 and f"job {job_id} is done: only a queued job can be cancelled" in run.stderr


def test_jobs_show_progress_of_a_running_job(db_url: str, cm: Callable[..., Run]) -> None:
    job_id = make_job(db_url, status="running", result={"progress": {"done": 250, "total": 1000}})
    assert "progress: 25% (250 of 1000)" in cm(f"jobs show {job_id}").stdout
    assert cm(f"jobs show {job_id} --json").json()["progress"] == {"done": 250, "total": 1000}


# -- the service ------------------------------------------------------------------------------------------------


def test_create_job_refuses_an_unknown_kind(sqlite_url: str) -> None:
    with db.open_session(sqlite_url) as session, pytest.raises(InvalidInput, match="unknown job kind 'nope'"):
        records.create_job(session, "nope", {})


def test_handler_registry() -> None:
    assert records.HANDLERS["import"] == "campaign_manager.imports.service:run_import_job"
    records.register_handler("test-path", "queue_helpers:ok_handler")
    try:
        assert records.get_handler("test-path").__name__ == "ok_handler"
        records.register_handler("test-broken", "campaign_manager.nowhere:handler")
        with pytest.raises(CmError, match="cannot load the handler of job kind 'test-broken'"):
            records.get_handler("test-broken")
    finally:
        records.unregister_handler("test-path")
        records.unregister_handler("test-broken")
    with pytest.raises(InvalidInput, match="no handler for job kind 'test-path'"):
        records.get_handler("test-path")


def test_missing_job(sqlite_url: str) -> None:
    with pytest.raises(NotFound):
        runner.run_job(sqlite_url, 12345, worker="test")


def test_run_job_outside_the_queue(db_url: str) -> None:
    """What `--wait` does: run the job here, with a progress callback; a failure is final."""
    seen: list[tuple[int, int]] = []
    job_id = make_job(db_url)
    job = runner.run_job(db_url, job_id, worker="cm --wait", progress=lambda done, total: seen.append((done, total)))
    assert (job.status, job.worker, job.counts["created"]) == ("done", "cm --wait", 1)
    assert seen[-1] == (1, 1) and job.result["progress"] == {"done": 1, "total": 1}

    failing = make_job(db_url, "test-fail")
    job = runner.run_job(db_url, failing, worker="cm --wait")
    assert (job.status, job.error, job.attempts) == ("failed", "RuntimeError: boom", 1)
    # A second run finds it failed and leaves it alone.
    assert runner.attempt_job(db_url, failing, worker="cm --wait").outcome == runner.Outcome.SKIPPED


def _blocking_kind(
    url: str, started: threading.Event, go: threading.Event, *, write_result: bool = False
) -> Callable[..., dict[str, Any]]:
    def handler(url_: str, job_id: int, progress: Callable[[int, int], None]) -> dict[str, Any]:
        started.set()
        step = 0
        while not go.wait(0.01):
            step += 1
            progress(step, 1000)
        if write_result:
            # The import marks its own result in its own transaction; the heartbeat must not undo that.
            with db.open_session(url) as session:
                job = session.get(Job, job_id)
                assert job is not None
                job.result = {**job.result, "committed": True}
        return {"read": step}

    return handler


def test_heartbeat_renews_the_lease_and_keeps_the_handlers_result(db_url: str) -> None:
    started, go = threading.Event(), threading.Event()
    records.register_handler("test-block", _blocking_kind(db_url, started, go, write_result=True))
    try:
        job_id = make_job(db_url, "test-block")
        attempts: list[runner.Attempt] = []
        thread = threading.Thread(
            target=lambda: attempts.append(runner.attempt_job(db_url, job_id, worker="w1", lease_seconds=0.3))
        )
        thread.start()
        started.wait(10)
        first_lease = read_job(db_url, job_id).lease_until
        assert first_lease is not None

        def renewed() -> bool:
            job = read_job(db_url, job_id)
            return job.lease_until is not None and job.lease_until > first_lease and bool(job.result.get("progress"))

        from queue_helpers import wait_for

        wait_for(renewed, what="the heartbeat")
        assert leases.active_jobs() == [job_id]
        go.set()
        thread.join(10)
    finally:
        records.unregister_handler("test-block")
    [attempt] = attempts
    job = read_job(db_url, job_id)
    assert attempt.outcome == runner.Outcome.DONE and job.status == "done" and job.lease_until is None
    assert job.result["committed"] is True and job.result["progress"]["total"] == 1000
    assert leases.active_jobs() == []


def test_release_puts_the_job_back(db_url: str) -> None:
    started, go = threading.Event(), threading.Event()
    records.register_handler("test-block", _blocking_kind(db_url, started, go))
    enqueued: list[int] = []
    try:
        job_id = make_job(db_url, "test-block")
        attempts: list[runner.Attempt] = []
        thread = threading.Thread(target=lambda: attempts.append(runner.attempt_job(db_url, job_id, worker="w1")))
        thread.start()
        started.wait(10)
        assert leases.release_jobs(db_url, enqueue=enqueued.append) == [job_id]
        thread.join(10)
        job = read_job(db_url, job_id)
        assert attempts[0].outcome == runner.Outcome.RELEASED and enqueued == [job_id]
        assert (job.status, job.attempts, job.lease_until, job.counts) == ("queued", 0, None, {})
        # The next worker claims it as usual.
        go.set()
        assert runner.run_job(db_url, job_id, worker="w2").status == "done"
    finally:
        go.set()
        records.unregister_handler("test-block")


def test_a_run_that_lost_its_lease_cannot_overwrite_the_next_one(db_url: str) -> None:
    """Worker 1 stalls past its lease, worker 2 takes the job over and finishes it; worker 1's late result is
    dropped (fenced on status, worker and attempts)."""
    started, go = threading.Event(), threading.Event()
    calls: list[int] = []

    def handler(url: str, job_id: int, progress: Callable[[int, int], None]) -> dict[str, Any]:
        calls.append(job_id)
        if len(calls) == 1:
            started.set()
            go.wait(10)  # stalled: no progress calls, so it cannot notice anything
            return {"read": -1}
        return {"read": 1}

    records.register_handler("test-stall", handler)
    try:
        job_id = make_job(db_url, "test-stall")
        first: list[runner.Attempt] = []
        thread = threading.Thread(
            target=lambda: first.append(runner.attempt_job(db_url, job_id, worker="w1", lease_seconds=600))
        )
        thread.start()
        started.wait(10)
        with db.open_session(db_url) as session:  # as if worker 1 had stopped renewing its lease long ago
            job = session.get(Job, job_id)
            assert job is not None
            job.lease_until = utcnow() - timedelta(seconds=1)
        second = runner.attempt_job(db_url, job_id, worker="w2")
        go.set()
        thread.join(10)
    finally:
        go.set()
        records.unregister_handler("test-stall")
    assert second.outcome == runner.Outcome.DONE and first[0].outcome == runner.Outcome.LOST
    job = read_job(db_url, job_id)
    assert (job.status, job.worker, job.attempts, job.counts) == ("done", "w2", 2, {"read": 1})


def test_recover_stale_jobs(db_url: str) -> None:
    past, future = utcnow() - timedelta(seconds=5), utcnow() + timedelta(minutes=5)
    stale = make_job(db_url, status="running", attempts=1, worker="dead:1", lease_until=past)
    live = make_job(db_url, status="running", attempts=1, worker="alive:2", lease_until=future)
    worn = make_job(db_url, status="running", attempts=4, worker="dead:1", lease_until=past)
    enqueued: list[int] = []

    recovery = records.recover_stale_jobs(db_url, enqueue=enqueued.append, max_attempts=4)

    assert (recovery.requeued, recovery.failed, enqueued) == ([stale], [worn], [stale])
    assert read_job(db_url, stale).status == "queued" and read_job(db_url, live).status == "running"
    assert read_job(db_url, worn).status == "failed"
    assert records.recover_stale_jobs(db_url, enqueue=enqueued.append).requeued == []
