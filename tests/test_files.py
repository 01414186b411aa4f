"""Files and folders cm creates are readable by their owner only, whatever the umask: they hold addresses (the
database, the queue, rejected rows) or passwords (campaign.toml). And a config file holding a password that every
local user can read gets one warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from campaign_manager import db
from campaign_manager.config import load_settings
from campaign_manager.jobs import queue, records
from conftest import Run
from queue_helpers import HERE, register_kinds, unregister_kinds

Cm = Callable[..., Run]


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def _cm(args: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real `cm` (with the test job kinds) in a process with the usual umask, 022."""
    done = subprocess.run(
        [sys.executable, str(HERE), "cm", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert done.returncode == 0, f"cm {' '.join(args)}: {done.stderr}"
    return done


def test_what_cm_creates_is_private(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env.update(XDG_DATA_HOME=str(tmp_path / "xdg-data"), XDG_CONFIG_HOME=str(tmp_path / "xdg-config"))
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "xdg-data" / "campaign-manager"

    _cm(["group", "create", "news"], env=env, cwd=work)  # the default location, made on first use
    assert (_mode(data), _mode(data / "cm.db")) == ("0o700", "0o600")

    (work / "people.csv").write_text("email\nada@example.com\nnot-an-address\n", encoding="utf-8")
    _cm(["group", "add-recipients", "news", "--csv", "people.csv"], env=env, cwd=work)
    assert _mode(data / "cm-queue.db") == "0o600"
    _cm(["worker", "--drain"], env=env, cwd=work)
    _cm(["jobs", "show", "1", "--rejects-file", "rejects.csv"], env=env, cwd=work)
    assert "not-an-address" in (work / "rejects.csv").read_text() and _mode(work / "rejects.csv") == "0o600"

    _cm(["init"], env=env, cwd=work)
    assert _mode(work / "campaign.toml") == "0o600"
    _cm(["--database", "named.db", "db", "upgrade"], env=env, cwd=work)
    assert _mode(work / "named.db") == "0o600"

    # SQLite gives a database's -wal and -shm files its own mode: a job notes them while its connection is open.
    url = f"sqlite:///{data / 'cm.db'}"
    register_kinds()
    try:
        with db.open_session(url) as session:
            job_id = int(records.create_job(session, "test-modes", {"log": str(tmp_path / "modes.json")}).id or 0)
        queue.enqueue_job(load_settings(None, {"database.url": url}), job_id)
    finally:
        unregister_kinds()
        db.dispose_engines()
    assert not (data / "cm.db-wal").exists()  # made by the drain below, not by this test
    _cm(["worker", "--drain"], env=env, cwd=tmp_path)
    modes = json.loads((tmp_path / "modes.json").read_text())
    assert len(modes) == 6 and set(modes.values()) == {"0o600"}, modes


def test_an_existing_file_keeps_its_mode(cm_bare: Cm, tmp_path: Path) -> None:
    # The owner chose it (a group-readable config for a systemd unit, say): cm only creates files privately.
    target = tmp_path / "campaign.toml"
    target.write_text("", encoding="utf-8")
    target.chmod(0o640)
    cm_bare("init --force")
    assert _mode(target) == "0o640" and "[database]" in target.read_text()


SECRET = "s3cret-pw"


@pytest.mark.parametrize(
    ("text", "mode", "warned"),
    [
        (f'[database]\nurl = "postgresql://cm:{SECRET}@127.0.0.1:1/cm"\n', 0o644, True),
        (f'[queue]\nurl = "redis://:{SECRET}@127.0.0.1:1/0"\n', 0o604, True),
        (f'[database]\nurl = "postgresql://cm:{SECRET}@127.0.0.1:1/cm"\n', 0o640, False),  # a unit's group: fine
        (f'[database]\nurl = "postgresql://cm:{SECRET}@127.0.0.1:1/cm"\n', 0o600, False),
        ('[database]\nurl = "postgresql://cm@127.0.0.1:1/cm"\n', 0o644, False),  # no password in it
    ],
)
def test_a_world_readable_config_file_with_a_password_is_warned_about_once(
    cm_bare: Cm, tmp_path: Path, text: str, mode: int, warned: bool
) -> None:
    path = tmp_path / "campaign.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    run = cm_bare("config show --json")
    lines = run.stderr.strip().splitlines()
    if not warned:
        assert lines == []
        return
    assert len(lines) == 1, run.stderr
    assert "WARNING" in lines[0] and f"{path.resolve()} holds a password" in lines[0]
    assert f"chmod o-r {path.resolve()}" in lines[0] and SECRET not in lines[0]
    assert cm_bare("-q config show").stderr == ""  # --quiet: errors only


def test_the_config_warning_comes_once_per_command(tmp_path: Path) -> None:
    path = tmp_path / "campaign.toml"
    path.write_text(f'[database]\nurl = "postgresql://cm:{SECRET}@127.0.0.1:1/cm"\n', encoding="utf-8")
    path.chmod(0o644)
    done = subprocess.run(
        [sys.executable, str(HERE), "cm", "group", "list"],
        env={k: v for k, v in os.environ.items() if not k.startswith("CM_")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 6 and len(lines) == 2, done.stderr  # the warning, then why the database is out of reach
    assert "holds a password" in lines[0] and lines[1].startswith("error: cannot open database")


def test_creating_a_private_file_never_opens_one_that_exists(tmp_path: Path) -> None:
    # Closing any descriptor of a SQLite file drops every lock the process holds on it: a "create if missing"
    # that opened the existing queue file broke the locks of the process's other connections (disk I/O errors).
    import sqlite3

    from campaign_manager.files import create_private

    path = tmp_path / "locked.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN EXCLUSIVE")
    try:
        create_private(path)
        write = f"import sqlite3; sqlite3.connect({str(path)!r}, timeout=0).execute('BEGIN IMMEDIATE')"
        other = subprocess.run(
            [sys.executable, "-c", write],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        conn.close()
    assert other.returncode != 0 and "database is locked" in other.stderr
