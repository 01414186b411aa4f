"""`cm worker` when what it stands on fails: its database file deleted or replaced (it stops, exit 6), its
database read-only (the job is handed back at once, the worker backs off), its queue out of reach (one line an
attempt, capped backoff, and it carries on once the queue is back; a drain exits 8). Real worker processes,
a real redis-server, the real PostgreSQL server (only the test's own database is touched)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from campaign_manager import db
from conftest import run_cm_process
from queue_helpers import QueueSetup, cm_process, register_kinds, unregister_kinds, wait_for

# -- the database under a running worker ------------------------------------------------------------------------


def _db_path(qs: QueueSetup) -> Path:
    path = db.sqlite_path(qs.db_url)
    assert path is not None
    return path


def _take_away(path: Path, how: str) -> None:
    """Delete the database file (with its -wal and -shm), or put another cm database in its place."""
    if how == "deleted":
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
    else:
        other = path.with_name("restored.db")
        db.upgrade(f"sqlite:///{other}")
        db.dispose_engines()
        os.replace(other, path)


def _assert_left_alone(path: Path, how: str) -> None:
    """Nothing made a new database file, or wrote into the one put in its place."""
    if how == "deleted":
        assert not path.exists()
    else:
        with sa.create_engine(f"sqlite:///{path}").connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM job")).scalar() == 0


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_worker_whose_database_file_goes_away_stops(qs_sqlite: QueueSetup, how: str) -> None:
    # It used to recreate an empty database at the next command and carry on: jobs, recipients and opt-outs gone.
    qs = qs_sqlite
    proc = cm_process(qs, "worker")
    try:
        wait_for(lambda: "started: 1 thread(s)" in proc.stderr, what="the worker to start")
    except AssertionError:
        raise AssertionError(proc.kill()) from None
    path = _db_path(qs)
    _take_away(path, how)
    qs.huey().run_job_task(1)  # a message for it to take, as a new job's would be

    code, err = proc.wait(60)

    assert code == 6, err
    assert err.strip().splitlines()[-1] == (
        f"error: the database file {path} was deleted or replaced while cm was running"
        " (start cm again once the right file is in place)"
    )
    assert "Traceback" not in err
    _assert_left_alone(path, how)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_drain_whose_database_file_goes_away_mid_job_stops(qs_sqlite: QueueSetup, how: str) -> None:
    qs = qs_sqlite
    job_id = qs.queue("test-ok", sleep=1.5, steps=30)
    proc = cm_process(qs, "worker", "--drain")
    wait_for(lambda: qs.runs(job_id) == 1, what="the drain to start the job")
    path = _db_path(qs)
    _take_away(path, how)

    code, err = proc.wait(60)

    assert code == 6, err
    assert err.strip().splitlines()[-1].startswith(f"error: the database file {path} was deleted or replaced")
    assert "Traceback" not in err
    _assert_left_alone(path, how)


def _pg_admin(url: str, *statements: str) -> None:
    """Run statements about the test's own database from a connection to the server's `postgres` database."""
    import psycopg

    base = url.rpartition("/")[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.mark.postgres
def test_a_worker_whose_postgres_database_turns_read_only_hands_the_job_back(
    request: pytest.FixtureRequest, postgres_url: str, tmp_path: Path
) -> None:
    # It used to log tracebacks and leave the job `running` for a whole lease. The lease is long here (120 s): the
    # job must be back and done within seconds of the database taking writes again.
    name = postgres_url.rpartition("/")[2]
    qs = QueueSetup("postgres", postgres_url, f"sqlite:///{tmp_path / 'queue.db'}", "cm", tmp_path)
    qs.options["worker.lease_seconds"] = 120.0
    register_kinds()
    proc = None
    try:
        job_id = qs.queue("test-ok", sleep=2, steps=40)
        proc = cm_process(qs, "worker")
        wait_for(lambda: qs.runs(job_id) == 1, what="the worker to start the job")
        # Read-only for every new session, and the worker's sessions ended: the next ones are read-only.
        _pg_admin(
            postgres_url,
            f'ALTER DATABASE "{name}" SET default_transaction_read_only = on',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )
        wait_for(lambda: "cannot be written or reached" in proc.stderr, what="the worker to see the fault")
        time.sleep(2)  # it keeps trying to hand the job back, and cannot yet
        assert qs.job(job_id).status == "running"
        _pg_admin(postgres_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        writable = time.monotonic()
        db.dispose_engines()  # this test's own sessions were made read-only too
        qs.update_args(job_id, sleep=0, steps=1)
        wait_for(lambda: qs.job(job_id).status == "done", what="the job to be handed back and run")
        assert time.monotonic() - writable < 30  # not a lease (120 s)
        code, err = proc.stop()
    finally:
        _pg_admin(postgres_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        if proc is not None and proc.popen.poll() is None:
            proc.kill()
        unregister_kinds()
        qs.close()
    assert code == 0, err
    assert "Traceback" not in err
    faults = [line for line in err.splitlines() if "cannot be written or reached" in line]
    assert len(faults) == 1 and f"job {job_id} (test-ok)" in faults[0] and "read-only transaction" in faults[0], err
    job = qs.job(job_id)
    assert (job.attempts, qs.runs(job_id), job.error) == (1, 2, None)  # the handed-back attempt did not count


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="needs root on Linux (see below)")
def test_a_worker_whose_sqlite_file_turns_read_only_hands_the_job_back(qs_sqlite: QueueSetup) -> None:
    # Root ignores file modes, so the worker runs without the capabilities that let it (queue_helpers.
    # obey_file_modes), and the test takes the write permission away from the database file, then gives it back.
    qs = qs_sqlite
    qs.options["worker.lease_seconds"] = 120.0
    path = _db_path(qs)
    job_id = qs.queue("test-ok", sleep=2, steps=40)
    proc = cm_process(qs, "worker", obeying_file_modes=True)
    try:
        wait_for(lambda: qs.runs(job_id) == 1, what="the worker to start the job")
        path.chmod(0o400)
        wait_for(lambda: "cannot be written or reached" in proc.stderr, what="the worker to see the fault")
        time.sleep(2)  # it keeps trying to hand the job back, and cannot yet
        assert qs.job(job_id).status == "running"
        path.chmod(0o600)
        writable = time.monotonic()
        qs.update_args(job_id, sleep=0, steps=1)
        wait_for(lambda: qs.job(job_id).status == "done", what="the job to be handed back and run")
        assert time.monotonic() - writable < 30  # not a lease (120 s)
    finally:
        path.chmod(0o600)
        code, err = proc.stop()
    assert code == 0, err
    assert "Traceback" not in err
    faults = [line for line in err.splitlines() if "cannot be written or reached" in line]
    assert len(faults) == 1 and f"job {job_id} (test-ok)" in faults[0] and "readonly database" in faults[0], err
    job = qs.job(job_id)
    assert (job.attempts, qs.runs(job_id), job.error) == (1, 2, None)  # the handed-back attempt did not count


# -- the queue out of reach -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _redis_server(port: int, folder: Path) -> Iterator[None]:
    """A real redis-server on `port`, for as long as the block runs."""
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), what="redis-server to listen")
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def _forwarder(port: int, target: tuple[str, int]) -> Iterator[None]:
    """The PostgreSQL server, reachable on `port` for as long as the block runs; leaving it cuts every connection
    made through it, as a server going away would."""
    listener = socket.create_server(("127.0.0.1", port))
    sockets: list[socket.socket] = [listener]

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _addr = listener.accept()
                server = socket.create_connection(target)
                sockets.extend([client, server])
                for src, dst in ((client, server), (server, client)):
                    threading.Thread(target=pump, args=(src, dst), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


UNREACHABLE = re.compile(r"cannot reach the queue (\S+): .* \(trying again in (\d+) s\)$")


def _attempts(err: str) -> list[int]:
    """The delays the worker announced, one log line per attempt at reaching its queue."""
    return [int(m.group(2)) for line in err.splitlines() if (m := UNREACHABLE.search(line))]


def _queue_comes_and_goes(qs: QueueSetup, server: Callable[[], Any]) -> None:
    """A worker started with its queue out of reach waits for it (one line an attempt, growing delays), runs a
    job once it is there, waits again while it is gone, and runs another when it is back."""
    register_kinds()
    proc = cm_process(qs, "worker")
    try:
        wait_for(lambda: len(_attempts(proc.stderr)) >= 3, what="three attempts at the queue")
        assert _attempts(proc.stderr)[:3] == [1, 2, 4]
        assert "started" not in proc.stderr  # it starts once the queue answers
        with server():
            first = qs.queue("test-ok")
            wait_for(lambda: qs.job(first).status == "done", timeout=60, what="the first job")
        before = len(_attempts(proc.stderr))
        wait_for(lambda: len(_attempts(proc.stderr)) >= before + 2, what="the worker to miss its queue again")
        with server():
            second = qs.queue("test-ok")
            wait_for(lambda: qs.job(second).status == "done", timeout=90, what="the second job")
        code, err = proc.stop()
    finally:
        if proc.popen.poll() is None:
            proc.kill()
        unregister_kinds()
        qs.close()
    assert code == 0, err
    assert "Traceback" not in err and "Error reading" not in err  # none of Huey's own traceback lines
    attempts = _attempts(err)
    assert len(attempts) < 20 and max(attempts) <= 60, err  # ~150 lines a second, before
    assert all(line.startswith("20") for line in err.splitlines()), err  # log lines, one each


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_worker_waits_for_its_redis_queue(sqlite_url: str, tmp_path: Path) -> None:
    port = _free_port()
    # (Not "redis": that backend's clean-up flushes the queue, and this server is gone by then, with its data.)
    qs = QueueSetup("throwaway-redis", sqlite_url, f"redis://127.0.0.1:{port}/0", "cm", tmp_path)
    _queue_comes_and_goes(qs, lambda: _redis_server(port, tmp_path))


@pytest.mark.postgres
def test_a_worker_waits_for_its_postgres_queue(postgres_url: str, tmp_path: Path) -> None:
    port = _free_port()
    target = urlsplit(postgres_url)
    forwarded = urlunsplit(target._replace(netloc=f"{target.username}@127.0.0.1:{port}"))
    qs = QueueSetup("postgres", postgres_url, forwarded, "cm", tmp_path)
    _queue_comes_and_goes(qs, lambda: _forwarder(port, (target.hostname or "127.0.0.1", target.port or 5432)))


@pytest.mark.parametrize("scheme", ["redis", "postgres"])
def test_a_drain_with_its_queue_out_of_reach_exits_8_in_one_line(sqlite_url: str, tmp_path: Path, scheme: str) -> None:
    # With Redis it exited 70, "internal error: ConnectionError".
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"postgresql://cm:pw@127.0.0.1:{port}/cm"
    done = run_cm_process(["worker", "--drain"], env={"CM_DATABASE_URL": sqlite_url, "CM_QUEUE_URL": url}, cwd=tmp_path)
    assert done.returncode == 8, done.stderr
    lines = done.stderr.strip().splitlines()
    masked = url.replace(":pw@", ":********@")
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the queue {masked}: "), done.stderr
