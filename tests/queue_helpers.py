"""What the queue tests share: throwaway job kinds, a queue on each backend, and a way to run the real `cm` in a
subprocess with those kinds registered (`python queue_helpers.py cm worker --drain`).

The test kinds record every run as a line in a file named in the job's arguments, so that a test can count runs
across processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from campaign_manager import db
from campaign_manager.config import Settings, load_settings
from campaign_manager.errors import InvalidInput
from campaign_manager.models import Job

REDIS_URL = os.environ.get("CM_TEST_REDIS_URL")
HERE = Path(__file__).resolve()


def _args(url: str, job_id: int) -> dict[str, Any]:
    with db.open_session(url, write=False) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return dict(job.args)


def _record(args: dict[str, Any], job_id: int) -> int:
    """Note this run; returns how many runs of the job there have been, this one included."""
    path = Path(args["log"])
    with path.open("a") as f:
        f.write(f"{job_id}\n")
    return runs_of(path, job_id)


def runs_of(path: Path, job_id: int) -> int:
    if not path.exists():
        return 0
    return path.read_text().split().count(str(job_id))


def _work(args: dict[str, Any], progress: Callable[[int, int], None]) -> None:
    steps = int(args.get("steps", 1))
    for step in range(steps):
        progress(step, steps)
        time.sleep(float(args.get("sleep", 0)) / steps)
    progress(steps, steps)


def ok_handler(url: str, job_id: int, progress: Callable[[int, int], None]) -> dict[str, Any]:
    """Idempotent: makes the group `job-<id>` unless it exists."""
    from campaign_manager.audience import groups

    args = _args(url, job_id)
    _record(args, job_id)
    _work(args, progress)
    with db.open_session(url) as session:
        created = groups.find_group(session, f"job-{job_id}") is None
        if created:
            groups.create_group(session, f"job-{job_id}")
    return {"read": int(args.get("n", 1)), "created": int(created)}


def fail_handler(url: str, job_id: int, progress: Callable[[int, int], None]) -> dict[str, Any]:
    args = _args(url, job_id)
    _record(args, job_id)
    raise RuntimeError(args.get("reason", "boom"))


def refuse_handler(url: str, job_id: int, progress: Callable[[int, int], None]) -> dict[str, Any]:
    args = _args(url, job_id)
    _record(args, job_id)
    raise InvalidInput(args.get("reason", "the file has no email column"))


def flaky_handler(url: str, job_id: int, progress: Callable[[int, int], None]) -> dict[str, Any]:
    """Fails its first `fail_times` runs."""
    args = _args(url, job_id)
    if _record(args, job_id) <= int(args["fail_times"]):
        raise ConnectionError("the SMTP server went away")
    return {"read": 1}


def modes_handler(url: str, job_id: int, progress: Callable[[int, int], None]) -> dict[str, Any]:
    """Writes into the database and, while its connection is open (so SQLite's -wal and -shm files exist, made by
    this process), notes the mode of each file beside the database and the queue in the file args["log"]."""
    from campaign_manager.audience import groups
    from campaign_manager.config import default_queue_url

    args = _args(url, job_id)
    path = db.sqlite_path(url)
    queue = db.sqlite_path(default_queue_url(url))
    assert path is not None and queue is not None
    with db.open_session(url) as session:
        groups.create_group(session, f"job-{job_id}")
        session.flush()
        names = [Path(f"{base}{suffix}") for base in (path, queue) for suffix in ("", "-wal", "-shm")]
        modes = {str(name): oct(name.stat().st_mode & 0o777) for name in names}
    Path(args["log"]).write_text(json.dumps(modes))
    return {}


KINDS: dict[str, Callable[[str, int, Callable[[int, int], None]], dict[str, Any]]] = {
    "test-ok": ok_handler,
    "test-fail": fail_handler,
    "test-refuse": refuse_handler,
    "test-flaky": flaky_handler,
    "test-modes": modes_handler,
}


def register_kinds() -> None:
    from campaign_manager.jobs import records

    for kind, handler in KINDS.items():
        records.register_handler(kind, handler)


def unregister_kinds() -> None:
    from campaign_manager.jobs import records

    for kind in KINDS:
        records.unregister_handler(kind)


# Test settings: fast retries. Each key maps to its environment variable for subprocesses.
TEST_SETTINGS: dict[str, Any] = {
    "worker.retries": 2,
    "worker.retry_delay": 0.01,
    "worker.retry_backoff": 2.0,
    "worker.lease_seconds": 60.0,
}


@dataclass
class QueueSetup:
    """A database and a queue on one backend, with helpers to queue test jobs and look at them."""

    backend: str
    db_url: str
    queue_url: str | None
    queue_name: str
    tmp: Path
    options: dict[str, Any] = field(default_factory=lambda: dict(TEST_SETTINGS))
    _hueys: list[Any] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.tmp / "runs.log"

    def settings(self, **options: Any) -> Settings:
        flags = {"database.url": self.db_url, "queue.url": self.queue_url, "queue.name": self.queue_name}
        flags.update(self.options)
        flags.update({key.replace("__", "."): value for key, value in options.items()})
        return load_settings(None, flags)

    def env(self, **options: Any) -> dict[str, str]:
        from campaign_manager.config import KEYS

        env = {k: v for k, v in os.environ.items() if not k.startswith("CM_") or k.startswith("CM_TEST_")}
        values = {"database.url": self.db_url, "queue.url": self.queue_url, "queue.name": self.queue_name}
        values.update(self.options)
        values.update({key.replace("__", "."): value for key, value in options.items()})
        for key, value in values.items():
            if value is not None:
                env[str(KEYS[key].env)] = str(value)
        return env

    def huey(self) -> Any:
        from campaign_manager.jobs.queue import get_huey

        huey = get_huey(self.settings(), blocking=False)
        self._hueys.append(huey)
        return huey

    def queue(self, kind: str = "test-ok", *, enqueue: bool = True, **args: Any) -> int:
        """A committed job of `kind`, on the queue unless enqueue=False."""
        from campaign_manager.jobs import records
        from campaign_manager.jobs.queue import enqueue_job

        with db.open_session(self.db_url) as session:
            job_id = int(records.create_job(session, kind, {"log": str(self.log), **args}).id or 0)
        if enqueue:
            enqueue_job(self.settings(), job_id)
        return job_id

    def job(self, job_id: int) -> Job:
        with db.open_session(self.db_url, write=False) as session:
            job = session.get(Job, job_id, populate_existing=True)
            assert job is not None
            return job

    def update_args(self, job_id: int, **args: Any) -> None:
        """Change what the job's next run does (a test handler reads its arguments when it starts)."""
        with db.open_session(self.db_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.args = {**job.args, **args}

    def runs(self, job_id: int) -> int:
        return runs_of(self.log, job_id)

    def close(self) -> None:
        from campaign_manager.jobs.queue import close_huey

        for huey in self._hueys:
            close_huey(huey)
        if self.backend == "redis":
            huey = self.huey()
            huey.storage.flush_all()  # only this test's queue name
            close_huey(huey)


def make_setup(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> QueueSetup:
    if backend == "sqlite":
        return QueueSetup(backend, str(request.getfixturevalue("sqlite_url")), None, "cm", tmp_path)
    if backend == "postgres":
        url = str(request.getfixturevalue("postgres_url"))
        return QueueSetup(backend, url, None, "cm", tmp_path)  # the queue's tables go into the same database
    if not REDIS_URL:
        pytest.skip("redis: CM_TEST_REDIS_URL is not set")
    # A queue name of our own, so that the test flushes nothing but its own keys.
    name = f"cmtest{uuid.uuid4().hex[:12]}"
    return QueueSetup(backend, str(request.getfixturevalue("sqlite_url")), REDIS_URL, name, tmp_path)


BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("redis", marks=pytest.mark.redis),
]


def queue_setup(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[QueueSetup]:
    """For fixtures: a database and queue on `backend`, with the test job kinds registered (and unregistered
    after, whatever happens)."""
    setup = make_setup(request, backend, tmp_path)
    register_kinds()
    try:
        yield setup
    finally:
        unregister_kinds()
        setup.close()


@dataclass
class CmProcess:
    """A `cm` subprocess. Its stderr goes to a file: a pipe nobody reads until the end would fill up with log
    lines and block the worker."""

    popen: subprocess.Popen[bytes]
    err_path: Path

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        return self.popen.wait(timeout), self.stderr

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.popen.send_signal(sig)
        return self.wait(60)

    def kill(self) -> str:
        self.popen.kill()
        return self.wait()[1]


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # from <linux/prctl.h>, <linux/capability.h>


def obey_file_modes() -> None:
    """In a child process before exec: drop the capabilities that let root ignore file modes from the bounding
    set, so that the program run next (as root still) cannot write a file whose mode says it may not."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def cm_process(setup: QueueSetup, *args: str, obeying_file_modes: bool = False, **options: Any) -> CmProcess:
    """The real `cm` in a subprocess, with the test kinds registered; `obeying_file_modes`: even as root (see
    obey_file_modes)."""
    err_path = setup.tmp / f"cm-{uuid.uuid4().hex[:8]}.err"
    with err_path.open("wb") as err:
        popen = subprocess.Popen(
            [sys.executable, str(HERE), "cm", *args],
            env=setup.env(**options),
            cwd=setup.tmp,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=obey_file_modes if obeying_file_modes else None,
        )
    return CmProcess(popen, err_path)


def wait_for(predicate: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds. The timeout only stops a broken test from hanging; it asserts nothing
    about speed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _enqueue_main(count: int, threads: int, log: str) -> int:
    """Queue `count` test jobs from each of `threads` threads, the way `cm` does it: a job row, then a message."""
    from campaign_manager.jobs import records
    from campaign_manager.jobs.queue import enqueue_job

    settings = load_settings(None)
    failures: list[BaseException] = []
    ids: list[int] = []

    def enqueue_some() -> None:
        try:
            for _ in range(count):
                with db.open_session(settings.database_url) as session:
                    job_id = int(records.create_job(session, "test-ok", {"log": log}).id or 0)
                enqueue_job(settings, job_id)
                with db.open_session(settings.database_url, write=False) as session:
                    records.list_jobs(session, limit=5)
                ids.append(job_id)
        except BaseException as exc:
            failures.append(exc)
            raise

    workers = [threading.Thread(target=enqueue_some) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    print("\n".join(map(str, ids)))
    return 1 if failures else 0


if __name__ == "__main__":
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    register_kinds()
    if sys.argv[1] == "cm":
        from campaign_manager.cli import app

        app(sys.argv[2:], prog_name="cm")
    elif sys.argv[1] == "enqueue":
        sys.exit(_enqueue_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
