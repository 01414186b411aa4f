"""`cm worker` as people run it: real subprocesses, real signals, several processes on one queue."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from campaign_manager.jobs import drain
from conftest import Run, make_cm
from queue_helpers import QueueSetup, cm_process, wait_for


@pytest.mark.parametrize(
    ("sig", "grace", "seconds", "expected"),
    [
        pytest.param(signal.SIGTERM, "30", 0.6, "done", id="sigterm-finishes"),
        pytest.param(signal.SIGTERM, "0.2", 30, "queued", id="sigterm-grace-runs-out"),
        pytest.param(signal.SIGINT, "30", 30, "queued", id="sigint-releases"),
    ],
)
def test_signal_stops_worker_cleanly(qs: QueueSetup, sig: int, grace: str, seconds: float, expected: str) -> None:
    job_id = qs.queue("test-ok", sleep=seconds, steps=int(seconds * 50))
    proc = cm_process(qs, "worker", "--grace", grace)
    try:
        wait_for(lambda: qs.runs(job_id) == 1, what="the worker to start the job")
    except AssertionError:
        raise AssertionError(proc.kill()) from None

    code, err = proc.stop(sig)

    assert code == 0, err
    assert f"job {job_id} (test-ok) started, attempt 1" in err
    job = qs.job(job_id)
    assert job.status == expected, err
    if expected == "queued":
        # Released: back on the queue, its attempt not counted, and the next worker finishes it.
        assert f"job {job_id} released" in err and job.attempts == 0 and job.lease_until is None
        qs.update_args(job_id, sleep=0, steps=1)
        report = drain.drain(qs.settings())
        assert report.outcomes == {job_id: "done"} and qs.job(job_id).status == "done"
        assert qs.runs(job_id) == 2
    else:
        assert f"job {job_id} (test-ok) done" in err and qs.runs(job_id) == 1
    assert "Traceback" not in err


def test_overlapping_drain_processes_never_run_a_job_twice(qs: QueueSetup) -> None:
    ids = [qs.queue("test-ok", sleep=0.01) for _ in range(30)]
    procs = [cm_process(qs, "worker", "--drain", "--workers", "2") for _ in range(3)]
    for code, err in [proc.wait() for proc in procs]:
        assert code == 0, err
    assert [qs.runs(job_id) for job_id in ids] == [1] * len(ids)
    assert {qs.job(job_id).status for job_id in ids} == {"done"}


def test_killed_worker_job_is_picked_up_by_the_next_drain(qs_sqlite: QueueSetup) -> None:
    qs = qs_sqlite
    qs.options["worker.lease_seconds"] = 0.5
    job_id = qs.queue("test-ok", sleep=30, steps=1000)
    proc = cm_process(qs, "worker")
    wait_for(lambda: qs.runs(job_id) == 1, what="the worker to start the job")
    proc.kill()  # no chance to release anything
    assert qs.job(job_id).status == "running"
    qs.update_args(job_id, sleep=0, steps=1)

    def drained() -> bool:
        drain.drain(qs.settings())
        return qs.job(job_id).status == "done"

    wait_for(drained, what="a drain to take over the job once its lease ran out")
    job = qs.job(job_id)
    assert job.attempts == 2 and qs.runs(job_id) == 2 and job.counts == {"read": 1, "created": 1}


def test_concurrent_enqueuers_with_a_worker_running(qs_sqlite: QueueSetup) -> None:
    """Several `cm` processes queueing jobs, each from several threads, while a worker takes them: nobody sees
    "database is locked"."""
    qs = qs_sqlite
    worker = cm_process(qs, "worker", "--workers", "3")
    try:
        import subprocess
        import sys

        from queue_helpers import HERE

        enqueuers = [
            subprocess.Popen(
                [sys.executable, str(HERE), "enqueue", "15", "3", str(qs.log)],
                env=qs.env(),
                cwd=qs.tmp,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        ids: list[int] = []
        for proc in enqueuers:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "locked" not in err, err
            ids += [int(line) for line in out.split()]
        assert len(set(ids)) == 4 * 3 * 15

        def all_done() -> bool:
            from sqlmodel import col, func, select

            from campaign_manager import db
            from campaign_manager.models import Job

            with db.open_session(qs.db_url, write=False) as session:
                return session.exec(select(func.count()).where(col(Job.status) == "done")).one() == len(ids)

        wait_for(all_done, timeout=120, what="the worker to finish every job")
    finally:
        code, err = worker.stop()
    assert code == 0 and "locked" not in err, err
    assert [qs.runs(job_id) for job_id in sorted(ids)] == [1] * len(ids)


@pytest.fixture
def cm(qs_sqlite: QueueSetup, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    for key, value in qs_sqlite.env().items():
        if key.startswith("CM_"):
            monkeypatch.setenv(key, value)
    return make_cm(qs_sqlite.db_url)


def test_drain_exit_codes_and_summary(qs_sqlite: QueueSetup, cm: Callable[..., Run]) -> None:
    assert "drain: no jobs were due" in cm("worker --drain").stderr

    ok, bad = qs_sqlite.queue("test-ok"), qs_sqlite.queue("test-refuse", reason="no email column")
    run = cm("worker --drain", ok=False)

    assert run.exit_code == 9
    assert f"job {ok} (test-ok) done" in run.stderr and f"job {bad} (test-refuse) failed: no email column" in run.stderr
    assert f"drain: 2 job(s): 1 done, 1 failed (job {bad})" in run.stderr
    assert f"error: 1 job(s) did not succeed: {bad}" in run.stderr
    assert run.stdout == ""


def test_drain_leaves_retries_not_yet_due(
    qs_sqlite: QueueSetup, cm: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_WORKER_RETRY_DELAY", "600")
    job_id = qs_sqlite.queue("test-flaky", fail_times=1)
    run = cm("worker --drain", ok=False)
    assert run.exit_code == 9 and f"1 waiting for a retry (job {job_id})" in run.stderr
    assert f"1 retry(ies) not yet due, left for a later run: job {job_id}; the next is due at" in run.stderr
    assert qs_sqlite.job(job_id).status == "queued"


def test_drain_quiet_prints_only_the_error(qs_sqlite: QueueSetup, cm: Callable[..., Run]) -> None:
    qs_sqlite.queue("test-ok")
    assert cm("-q worker --drain").stderr == ""
    bad = qs_sqlite.queue("test-refuse")
    assert cm("-q worker --drain", ok=False).stderr.strip().splitlines() == [
        f"error: 1 job(s) did not succeed: {bad} (see `cm jobs show ID`)"
    ]


def test_worker_rejects_a_bad_queue(
    qs_sqlite: QueueSetup, cm: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_QUEUE_URL", "ftp://example.com/queue")
    run = cm("worker --drain", ok=False)
    assert run.exit_code == 8 and "unsupported queue.url" in run.stderr


def test_long_running_worker_takes_jobs_queued_after_it_started(qs_sqlite: QueueSetup) -> None:
    proc = cm_process(qs_sqlite, "worker")
    try:
        time.sleep(0.2)
        job_id = qs_sqlite.queue("test-ok")
        wait_for(lambda: qs_sqlite.job(job_id).status == "done", what="the worker to run a new job")
    finally:
        code, err = proc.stop()
    assert code == 0, err
    assert "worker" in err and "started: 1 thread(s)" in err and "stopped" in err
