"""Shared fixtures: a real SQLite file per test, a real PostgreSQL database per test (created and dropped here)
when CM_TEST_POSTGRES_URL is set, `cm`, which runs the real CLI through Typer's CliRunner, and real SMTP servers
(`smtp_server`, aiosmtpd recording messages and injecting faults: tests/smtp_server.py; `smtp_sink_factory`,
postfix's smtp-sink: tests/smtp_sink.py).

The databases of `sqlite_url`, `postgres_url` and `db_url` are created and migrated here, as `cm db upgrade`
would: cm creates a database it is given by name only through that command. `new_db_url` is one cm has not
created yet (a SQLite path with no file; an empty PostgreSQL database)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import bigdb
from campaign_manager import db
from gateway_server import GatewayServer
from queue_helpers import BACKENDS, QueueSetup, queue_setup
from serve_process import serve_factory  # noqa: F401  (fixture: see the module)
from smtp_server import smtp_server, smtp_server_factory, tls_certificate  # noqa: F401  (fixtures: see the module)
from smtp_sink import smtp_sink_factory  # noqa: F401  (fixture: see the module)

POSTGRES_URL = os.environ.get("CM_TEST_POSTGRES_URL")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's config, data folder or CM_* variables."""
    for name in list(os.environ):
        if name.startswith("CM_") and not name.startswith("CM_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.chdir(tmp_path)
    yield
    db.dispose_engines()
    db._checked.clear()


def _server_url(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


def make_postgres_database() -> str:
    """Create an empty database on the test server; returns its URL. Fails (not skips) if the server is down."""
    import psycopg

    assert POSTGRES_URL is not None
    name = f"cm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_server_url(POSTGRES_URL, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return _server_url(POSTGRES_URL, name)


def drop_postgres_database(url: str) -> None:
    import psycopg

    db.dispose_engines()
    name = url.rpartition("/")[2]
    assert POSTGRES_URL is not None
    with psycopg.connect(_server_url(POSTGRES_URL, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cm.db'}"
    _create(url)
    return url


def _create(url: str) -> None:
    """What `cm db upgrade` does; then the test starts like a new process, with no engine or check cached."""
    db.upgrade(url)
    db.dispose_engines()


@pytest.fixture
def new_postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database: it exists on the server, without cm's tables."""
    if not POSTGRES_URL:
        pytest.skip("postgres: CM_TEST_POSTGRES_URL is not set")
    url = make_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture
def postgres_url(new_postgres_url: str) -> str:
    _create(new_postgres_url)
    return new_postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """The test runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database cm has not created yet, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'new.db'}"
    return str(request.getfixturevalue("new_postgres_url"))


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
def cm(db_url: str) -> Callable[..., Run]:
    """cm("group create news") runs the real CLI against the test's database."""
    return make_cm(db_url)


@pytest.fixture
def cm_sqlite(sqlite_url: str) -> Callable[..., Run]:
    return make_cm(sqlite_url)


@pytest.fixture
def cm_bare() -> Callable[..., Run]:
    """The CLI without --database: the database comes from the config file, CM_* variables or the default."""
    return make_cm(None)


def make_cm(url: str | None) -> Callable[..., Run]:
    from campaign_manager.cli import app

    runner = CliRunner()

    def run(args: str | list[str], *, input: str | None = None, ok: bool | None = True) -> Run:
        argv = shlex.split(args) if isinstance(args, str) else list(args)
        prefix = [] if url is None else ["--database", url]
        result = runner.invoke(app, [*prefix, *argv], input=input)
        out = Run(result.exit_code, result.stdout, result.stderr)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        if ok is True:
            assert out.exit_code == 0, f"cm {args} exited {out.exit_code}: {out.stderr}"
        elif ok is False:
            assert out.exit_code != 0, f"cm {args} should have failed: {out.stdout}"
        return out

    return run


def assert_error(run: Run, exit_code: int, *fragments: str) -> None:
    """A failure as the user must see it: the documented exit code, one `error:` line on stderr, no traceback,
    nothing on stdout."""
    lines = run.stderr.strip().splitlines()
    assert run.exit_code == exit_code, f"exit {run.exit_code}, stderr: {run.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


CM_BIN = Path(sys.executable).parent / "cm"


def run_cm_process(args: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script in a real process (the venv's `cm`), with a clean CM_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    return subprocess.run(
        [str(CM_BIN), *args], env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


# The queue backends (SQLite, PostgreSQL, Redis) that test_queue_backends and test_worker run against.


@pytest.fixture(params=BACKENDS)
def qs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueSetup]:
    yield from queue_setup(request, request.param, tmp_path)


@pytest.fixture
def qs_sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueSetup]:
    yield from queue_setup(request, "sqlite", tmp_path)


# One database of more than 250,000 recipients per test session and backend (tests/bigdb.py), built only when a
# test asks for it; each test gets a copy of its own.


@pytest.fixture(scope="session")
def big_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "template.db"
    bigdb.build_sqlite(path)
    return path


@pytest.fixture(scope="session")
def big_postgres_template() -> Iterator[str]:
    if not POSTGRES_URL:
        pytest.skip("postgres: CM_TEST_POSTGRES_URL is not set")
    url = make_postgres_database()
    try:
        bigdb.build_postgres(url)
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def big_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh copy of the big database (bigdb.EXPECTED says what it holds), on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield bigdb.copy_sqlite(request.getfixturevalue("big_sqlite_template"), tmp_path)
        return
    template = request.getfixturevalue("big_postgres_template")  # skips when there is no server
    assert POSTGRES_URL is not None
    with bigdb.copy_postgres(template, _server_url(POSTGRES_URL, "postgres")) as url:
        yield url


def small_segments(monkeypatch: pytest.MonkeyPatch, rows: int, *, batch_rows: int | None = None) -> None:
    """Imports apply segments of at most `rows` addresses (the first line of each, after the sort) and read the
    file in batches of `batch_rows` (default: `rows`), for tests of what happens between them."""
    from campaign_manager.imports import apply as import_sql
    from campaign_manager.imports import service as imports

    for dialect in import_sql.SEGMENT_ROWS:
        monkeypatch.setitem(import_sql.SEGMENT_ROWS, dialect, rows)
    monkeypatch.setattr(imports, "BATCH_ROWS", batch_rows or rows)


@pytest.fixture
def gateway_server() -> Iterator[GatewayServer]:
    """A real HTTP server on 127.0.0.1 standing in for a third-party gateway (tests/gateway_server.py)."""
    server = GatewayServer().start()
    try:
        yield server
    finally:
        server.stop()
