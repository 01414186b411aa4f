"""Imports commit in segments: the SQLite write lock is held a segment at a time, an interrupted import keeps what it
committed and resumes with exact counts, a run that lost its job commits nothing more, a target deleted meanwhile
fails the job at once, and a command that reports a failure leaves no job behind."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa

from campaign_manager import db
from campaign_manager.audience import recipients
from campaign_manager.imports import service as import_service
from campaign_manager.imports.apply import Applier
from campaign_manager.imports.postgres import PostgresApplier
from campaign_manager.imports.sqlite import SqliteApplier
from campaign_manager.jobs import records, runner, tasks
from campaign_manager.models import Job, utcnow
from conftest import CM_BIN, Run, assert_error, make_cm, small_segments

Cm = Callable[..., Run]

# 60,000 rows: 50,000 addresses, every fifth of them given again in another case later on, and 500 invalid rows.
DISTINCT, DUPLICATES, INVALID = 50_000, 10_000, 500


def _big_file(path: Path) -> Path:
    lines = ["email,name,plan"]
    for i in range(DISTINCT):
        lines.append(f"p{i}@example.com,Person {i},pro")
        if i % 5 == 4:
            lines.append(f"P{(i * 7919) % DISTINCT}@EXAMPLE.com,Again,free")  # a duplicate, often in a later segment
        if i % 100 == 0:
            lines.append(f"not-an-address-{i},Bad,x")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _expected(existing_members: int, opted_out: int) -> dict[str, int]:
    fresh = DISTINCT - existing_members - opted_out
    return {
        "read": DISTINCT + DUPLICATES + INVALID,
        "created": fresh,
        "updated": 0,
        "added": fresh,
        "already_member": existing_members,
        "duplicates": DUPLICATES,
        "invalid": INVALID,
        "suppressed": opted_out,
    }


def _job(url: str, job_id: int) -> Job:
    with db.open_session(url, write=False) as session:
        return records.get_job(session, job_id)


def _env(url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    return {**env, "CM_DATABASE_URL": url, **settings}


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _segments(url: str, job_id: int) -> int:
    result = _job(url, job_id).result or {}
    return int((result.get("resume") or {}).get("segments", result.get("segments", 0)))


@pytest.fixture
def news(cm: Cm) -> Cm:
    cm("group create news")
    return cm


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_wait_is_cancelled_and_retry_resumes_exactly(
    news: Cm, db_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    news(["group", "add-recipients", "news", *(f"--email=p{i}@example.com" for i in range(100))])
    news("recipient opt-out p100@example.com")
    path = _big_file(tmp_path / "big.csv")
    proc = subprocess.Popen(
        [str(CM_BIN), "group", "add-recipients", "news", "--csv", str(path), "--wait"],
        env=_env(db_url, CM_IMPORT_SEGMENT_ROWS="4000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: news("jobs list --json").json() != [] and _segments(db_url, 1) >= 2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and "interrupted: import job 1 cancelled" in lines[0], err
    assert "cm jobs retry 1" in lines[0] and "Traceback" not in err

    job = news("jobs show 1 --json").json()
    assert job["status"] == "cancelled" and signal.Signals(sig).name in job["error"]
    partial = job["counts"]
    assert partial["read"] == DISTINCT + DUPLICATES + INVALID and partial["invalid"] == INVALID  # the file was read
    assert 0 < partial["created"] < DISTINCT - 101  # ... and part of it applied
    members = news("group show news --json").json()["members"]
    assert members == 100 + partial["added"]  # what it committed stays, and its counts say exactly what

    news("worker --drain")  # nothing runs the rest unless asked
    assert news("jobs show 1 --json").json()["status"] == "cancelled"
    assert news("group show news --json").json()["members"] == members

    retried = news("jobs retry 1 --wait --json").json()
    assert retried["status"] == "done" and retried["counts"] == _expected(existing_members=100, opted_out=1)
    assert news("group show news --json").json()["members"] == DISTINCT - 1
    with db.open_session(db_url, write=False) as session:
        assert session.execute(sa.text("SELECT count(*) FROM job_file")).scalar() == 0  # the upload goes with it
    assert_error(news("jobs retry 1", ok=False), 4, "only a failed or cancelled job")


def test_segments_commit_and_an_opt_out_goes_through_meanwhile(news: Cm, db_url: str, tmp_path: Path) -> None:
    """200,000 rows in segments of 20,000: an opt-out typed during the import succeeds (the write lock is held a
    segment at a time on SQLite) and the job records every segment it committed."""
    path = tmp_path / "people.csv"
    path.write_text("email\n" + "".join(f"r{i}@example.com\n" for i in range(200_000)), encoding="utf-8")
    proc = subprocess.Popen(
        [str(CM_BIN), "-q", "group", "add-recipients", "news", "--csv", str(path), "--wait"],
        env=_env(db_url, CM_IMPORT_SEGMENT_ROWS="20000"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: news("jobs list --json").json() != [] and _segments(db_url, 1) >= 1)
        assert proc.poll() is None, "the import ended before the opt-out could run beside it"
        news("recipient opt-out r199999@example.com --reason busy")
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    job = news("jobs show 1 --json").json()
    counts = job["counts"]
    assert _job(db_url, 1).result["segments"] >= 2
    assert counts["created"] + counts["suppressed"] == 200_000 and counts["added"] == counts["created"]
    assert news("recipient show r199999@example.com --json").json()["status"] == "opted_out"


def test_a_run_that_lost_its_job_commits_nothing_more(
    news: Cm, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_segments(monkeypatch, 100)
    path = tmp_path / "people.csv"
    path.write_text("email\n" + "".join(f"s{i}@example.com\n" for i in range(1_000)), encoding="utf-8")
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    stolen = []

    def steal(done: int, total: int) -> None:
        if not stolen and _segments(db_url, job_id) == 3:  # three segments are in ...
            stolen.append(done)
            with db.get_engine(db_url).begin() as conn:  # ... and another worker takes the job over
                steal = "UPDATE job SET worker = 'thief', attempts = attempts + 1 WHERE id = :id"
                conn.execute(sa.text(steal), {"id": job_id})

    attempt = runner.attempt_job(db_url, job_id, worker="me", progress=steal)
    assert attempt.outcome == runner.Outcome.LOST
    assert news("group show news --json").json()["members"] == 300
    assert attempt.job.worker == "thief" and attempt.job.status == "running"


def test_an_import_whose_group_was_deleted_fails_at_once(news: Cm, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("email\nada@example.com\n", encoding="utf-8")
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    group_id = news("group show news --json").json()["id"]
    news("group delete news")
    drained = news("worker --drain", ok=False)
    assert drained.exit_code == 9 and drained.stderr.count("Traceback") == 0
    assert f"failed: group {group_id} no longer exists" in drained.stderr
    job = news(f"jobs show {job_id} --json").json()
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"].startswith(f"group {group_id} no longer exists")
    assert news("recipient list --json").json() == []


def test_retry_and_purge(news: Cm, db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("email\nada@example.com\n", encoding="utf-8")
    first = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    news(f"jobs cancel {first}")
    assert news(f"jobs retry {first}").stderr.startswith(f"queued job {first} again")
    news("worker --drain")
    assert news(f"jobs show {first} --json").json()["status"] == "done"
    assert_error(news(f"jobs retry {first}", ok=False), 4, "is done")

    second = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    news(f"jobs cancel {second}")
    assert news("jobs purge --json").json() == {"purged": []}  # not 7 days old yet
    assert news("jobs purge --older-than 0 --json").json() == {"purged": [second]}
    assert_error(news(f"jobs retry {second}", ok=False), 3, "staged upload was purged")
    assert news(f"jobs show {second} --json").json()["status"] == "cancelled"


def test_workers_purge_old_uploads_at_most_hourly(
    news: Cm, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_JOBS_KEEP_FILES_DAYS", "0")
    path = tmp_path / "people.csv"
    path.write_text("email\nada@example.com\n", encoding="utf-8")

    def cancelled_job() -> int:
        job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
        news(f"jobs cancel {job_id}")
        return job_id

    def has_file(job_id: int) -> bool:
        with db.get_engine(db_url).connect() as conn:
            query = sa.text("SELECT count(*) FROM job_file WHERE job_id = :id")
            return bool(conn.execute(query, {"id": job_id}).scalar())

    one = cancelled_job()
    news("worker --drain")
    assert not has_file(one)
    two = cancelled_job()
    news("worker --drain")
    assert has_file(two)  # the last purge was less than an hour ago
    with db.get_engine(db_url).begin() as conn:
        earlier = (utcnow() - timedelta(hours=2)).isoformat()
        conn.execute(sa.text("UPDATE cm_meta SET value = :v WHERE key = 'last_purge'"), {"v": earlier})
    news("worker --drain")
    assert not has_file(two)


def test_a_failure_at_the_commit_leaves_no_job_behind(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the staged file is committed (the queue's message is already sent): the command exits
    6, no job is left, and the message a later drain finds runs nothing."""
    cm = make_cm(sqlite_url)
    cm("group create news")
    path = tmp_path / "people.csv"
    path.write_text("email,name\n" + "".join(f"p{i}@example.com,Person {i}\n" for i in range(30_000)), encoding="utf-8")

    def full_disk() -> None:  # writes past 900 kB fail, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (900_000, 900_000))

    done = subprocess.run(
        [str(CM_BIN), "group", "add-recipients", "news", "--csv", str(path)],
        env=_env(sqlite_url),
        preexec_fn=full_disk,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 6 and done.stdout == "" and done.stderr.startswith("error: database error"), done.stderr
    assert cm("jobs list --json").json() == []
    monkeypatch.setattr(tasks, "NOT_YET_SAVED_S", 0.2)
    assert "1 skipped" in cm("worker --drain").stderr  # the message whose job never committed
    assert cm("jobs list --json").json() == [] and cm("group show news --json").json()["members"] == 0


def _overlapping(path: Path, own: str, *, upper: bool) -> Path:
    """SHARED addresses every file has (first in address order), then OWN of its own; every tenth shared address
    is given twice (a duplicate), and the shared ones in upper case if `upper`."""
    lines = ["email,name"]
    for i in range(SHARED):
        address = f"a-shared{i}@example.com"
        lines.append(f"{address.upper() if upper else address},S{i}")
        if i % 10 == 0:
            lines.append(f"{address},again")
    lines += [f"{own}{i}@example.com,O{i}" for i in range(OWN)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SHARED, OWN = 20_000, 5_000


def test_two_overlapping_imports_at_once_count_exactly(
    cm: Cm, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two imports of overlapping files at once, whose first segments try to apply the same addresses at the same
    moment: they take turns (SQLite's write lock; on PostgreSQL the lock on `recipient` that lets a segment create
    recipients without ON CONFLICT, without which one of the two fails on the unique address key). Every address
    gets one recipient, made by one of the two, and each job's counts are exact."""
    small_segments(monkeypatch, 1_000)
    cm("group create one")
    cm("group create two")
    one = _overlapping(tmp_path / "one.csv", "x-one", upper=False)
    two = _overlapping(tmp_path / "two.csv", "y-two", upper=True)
    job_ids = [int(cm(["group", "add-recipients", g, "--csv", str(p)]).stdout) for g, p in (("one", one), ("two", two))]

    # Each run's first segment, once it holds what it holds, waits (up to 2 s) for the other's to get as far.
    meet = threading.Barrier(2, timeout=2)
    met: list[int] = []

    def meeting(hold: Callable[..., None]) -> Callable[..., None]:
        def hold_then_meet(self: Applier, *, recipients: bool) -> None:
            hold(self, recipients=recipients)
            if recipients and self.job_id not in met:
                met.append(self.job_id)
                with contextlib.suppress(threading.BrokenBarrierError):
                    meet.wait()

        return hold_then_meet

    for kind in (SqliteApplier, PostgresApplier):
        monkeypatch.setattr(kind, "hold_writers", meeting(kind.hold_writers))
    outcomes: dict[int, dict[str, int] | BaseException] = {}

    def run(job_id: int) -> None:
        try:
            outcomes[job_id] = import_service.run_import_job(db_url, job_id)
        except BaseException as exc:  # reported below
            outcomes[job_id] = exc

    threads = [threading.Thread(target=run, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(met) == job_ids

    counts = [outcomes[job_id] for job_id in job_ids]
    assert all(isinstance(c, dict) for c in counts), counts
    counts = cast(list[dict[str, int]], counts)
    for c in counts:
        assert c["read"] == SHARED * 11 // 10 + OWN and c["duplicates"] == SHARED // 10
        assert c["added"] == SHARED + OWN and c["created"] >= OWN
        assert c["invalid"] == c["suppressed"] == c["already_member"] == c["updated"] == 0
    assert counts[0]["created"] + counts[1]["created"] == SHARED + 2 * OWN  # each shared one created once
    with db.get_engine(db_url).connect() as conn:
        found = conn.execute(sa.text("SELECT count(*), count(DISTINCT lower(email)) FROM recipient")).one()
        members = conn.execute(sa.text("SELECT count(*), count(DISTINCT recipient_id) FROM group_member")).one()
    assert tuple(found) == (SHARED + 2 * OWN,) * 2
    assert tuple(members) == (2 * (SHARED + OWN), SHARED + 2 * OWN)


def test_a_group_deleted_between_segments_fails_the_job_and_leaves_no_orphan(
    news: Cm, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each segment finds its group first and keeps it until it commits (on SQLite the import's connection checks
    no foreign keys: this is what keeps memberships from pointing at a group that is gone)."""
    small_segments(monkeypatch, 100)
    path = tmp_path / "people.csv"
    path.write_text("email\n" + "".join(f"g{i}@example.com\n" for i in range(1_000)), encoding="utf-8")
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    deleted = []

    def delete_group(done: int, total: int) -> None:
        if not deleted and _segments(db_url, job_id) == 3:
            deleted.append(done)
            news("group delete news")

    attempt = runner.attempt_job(db_url, job_id, worker="me", progress=delete_group)
    assert deleted and attempt.outcome == runner.Outcome.FAILED and "no longer exists" in (attempt.job.error or "")
    assert attempt.job.result["partial"]["created"] == 300  # what the three segments before it made is kept
    with db.get_engine(db_url).connect() as conn:
        orphans = "SELECT count(*) FROM group_member WHERE group_id NOT IN (SELECT id FROM recipient_group)"
        assert conn.execute(sa.text(orphans)).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM recipient")).scalar() == 300


def test_the_sqlite_import_connection_checks_no_foreign_keys(sqlite_url: str, tmp_path: Path) -> None:
    cm = make_cm(sqlite_url)
    cm("group create news")
    path = tmp_path / "people.csv"
    path.write_text("email\nada@example.com\n", encoding="utf-8")
    job_id = int(cm(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    with db.open_session(sqlite_url, write=False) as session:
        args = records.get_job(session, job_id).args
    applier = SqliteApplier(db.get_engine(sqlite_url), job_id, args)
    try:
        assert applier.start() is None
        assert applier.scalar("PRAGMA foreign_keys") == 0
    finally:
        applier.close()
    with db.get_engine(sqlite_url).connect() as conn:  # cm's other connections still check them
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1


def test_a_segment_gives_way_to_vacuum_and_an_opt_out_goes_through_meanwhile(postgres_url: str, tmp_path: Path) -> None:
    """On PostgreSQL a segment's lock on `recipient` conflicts with what (auto)vacuum and ANALYZE hold, which an
    opt-out's does not: a segment waiting for it would hold the opt-out up behind its own request. It waits briefly,
    gives way, and tries again; the opt-out goes through while the vacuum still runs, and the import ends exact."""
    import psycopg

    cm = make_cm(postgres_url)
    cm("group create news")
    path = tmp_path / "people.csv"
    path.write_text("email\n" + "".join(f"v{i}@example.com\n" for i in range(5_000)), encoding="utf-8")
    job_id = int(cm(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    vacuum = psycopg.connect(postgres_url)
    vacuum.execute("LOCK TABLE recipient IN SHARE UPDATE EXCLUSIVE MODE")  # what VACUUM and ANALYZE take
    released = threading.Timer(4.0, vacuum.rollback)  # whatever happens below
    released.start()
    outcome: list[dict[str, int] | BaseException] = []

    def run() -> None:
        try:
            outcome.append(import_service.run_import_job(postgres_url, job_id))
        except BaseException as exc:  # reported below
            outcome.append(exc)

    importing = threading.Thread(target=run)
    importing.start()
    try:
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE 'LOCK TABLE recipient IN SHARE ROW EXCLUSIVE MODE%'"
        )
        with psycopg.connect(postgres_url, autocommit=True) as watch:
            _wait_for(lambda: (watch.execute(waiting).fetchone() or (0,))[0] > 0, timeout=30)
        started = time.monotonic()
        with db.open_session(postgres_url) as session:
            recipients.opt_out_address(session, "meanwhile@example.org", reason=None, source="test")
        took = time.monotonic() - started
        still_vacuuming = released.is_alive()
    finally:
        released.join()
        importing.join(timeout=120)
        vacuum.close()
    assert still_vacuuming and took < 1.0, f"the opt-out took {took:.2f} s"
    assert outcome and isinstance(outcome[0], dict), outcome
    assert outcome[0]["created"] == outcome[0]["added"] == 5_000
