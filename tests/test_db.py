"""The database: who may create it (the default location on first use; a named one only by `cm db upgrade` or
`cm init --database`), a file deleted or replaced under a running process, migrations that match the models
exactly (SQLite and PostgreSQL), `cm db status/upgrade`, a schema behind or ahead of the code, and SQLite's
pragmas."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import campaign_manager.models  # noqa: F401  (registers the tables)
from campaign_manager import db
from campaign_manager.errors import DatabaseError
from conftest import CM_BIN, Run, assert_error, make_cm

Cm = Callable[..., Run]


def _tables(url: str) -> set[str]:
    with db.get_engine(url).connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def test_head_revision_is_alembics_head() -> None:
    script = ScriptDirectory.from_config(db._alembic_config(""))
    assert script.get_heads() == [db.HEAD_REVISION]
    assert db.all_revisions()[0] == db.HEAD_REVISION


def test_migrations_create_exactly_what_the_models_declare(db_url: str) -> None:
    db.upgrade(db_url)
    with db.get_engine(db_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diffs = compare_metadata(context, SQLModel.metadata)
    assert diffs == []
    assert _tables(db_url) == {*SQLModel.metadata.tables, "alembic_version"}


def test_the_default_database_is_created_and_migrated_on_first_use(cm_bare: Cm, tmp_path: Path) -> None:
    path = tmp_path / "xdg-data" / "campaign-manager" / "cm.db"
    assert cm_bare("recipient list --json").json() == []  # even a read creates it, and its folders
    assert path.is_file()
    status = cm_bare("db status --json").json()
    assert status == {
        "database": f"sqlite:///{path}",
        "revision": db.HEAD_REVISION,
        "head": db.HEAD_REVISION,
        "up_to_date": True,
    }


def test_db_status_of_the_default_location_creates_it_empty(cm_bare: Cm, tmp_path: Path) -> None:
    status = cm_bare("db status --json").json()
    assert (status["revision"], status["up_to_date"]) == (None, False)
    assert (tmp_path / "xdg-data" / "campaign-manager" / "cm.db").is_file()
    cm_bare("recipient list")  # and the next command migrates it
    assert cm_bare("db status --json").json()["up_to_date"] is True


def test_db_upgrade_creates_a_named_database(new_db_url: str) -> None:
    cm = make_cm(new_db_url)
    if db.is_sqlite(new_db_url):
        assert_error(cm("db status", ok=False), 6, "no cm database at", "cm db upgrade")  # no file: nothing to show
    else:
        before = cm("db status --json").json()  # an empty PostgreSQL database is there, at no revision
        assert (before["revision"], before["head"], before["up_to_date"]) == (None, db.HEAD_REVISION, False)
    upgraded = cm("db upgrade")
    assert f"empty -> {db.HEAD_REVISION}" in upgraded.stderr
    assert cm("db status --json").json()["up_to_date"] is True
    assert f"revision: {db.HEAD_REVISION}" in cm("db status").stdout
    cm("db upgrade")  # again: nothing to do, still fine
    assert _tables(new_db_url) >= set(SQLModel.metadata.tables)
    cm("group create news")
    assert [g["name"] for g in cm("group list --json").json()] == ["news"]


HEAD = db.HEAD_REVISION
NEXT = f"{int(HEAD) + 1:04d}"


def _newer_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process a cm release one migration ahead of the installed one: a copy of the shipped migrations
    plus a revision NEXT that adds a table."""
    migrations = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / f"{NEXT}_next.py").write_text(
        '"""next"""\n'
        "import sqlalchemy as sa\n"
        "from alembic import op\n\n"
        f'revision = "{NEXT}"\n'
        f'down_revision = "{db.HEAD_REVISION}"\n'
        "branch_labels = None\n"
        "depends_on = None\n\n\n"
        "def upgrade() -> None:\n"
        '    op.create_table("cm_next", sa.Column("id", sa.Integer(), primary_key=True))\n\n\n'
        "def downgrade() -> None:\n"
        '    op.drop_table("cm_next")\n',
        encoding="utf-8",
    )
    monkeypatch.setattr(db, "MIGRATIONS_DIR", migrations)
    monkeypatch.setattr(db, "HEAD_REVISION", NEXT)
    db._checked.clear()  # as in a new process


def test_a_schema_behind_the_code_asks_for_db_upgrade(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cm = make_cm(db_url)
    cm("recipient create ada@example.com")  # made by the current release, at its head
    _newer_release(tmp_path, monkeypatch)

    for command in ("recipient list", "recipient create bob@example.com", "group list"):
        assert_error(cm(command, ok=False), 6, f"schema is at revision {HEAD}, this cm needs {NEXT}", "cm db upgrade")
    status = cm("db status --json").json()
    assert (status["revision"], status["head"], status["up_to_date"]) == (HEAD, NEXT, False)

    assert f"{HEAD} -> {NEXT}" in cm("db upgrade").stderr
    assert [r["email"] for r in cm("recipient list --json").json()] == ["ada@example.com"]
    assert "cm_next" in _tables(db_url)


def test_a_schema_ahead_of_the_code_is_refused(db_url: str) -> None:
    cm = make_cm(db_url)
    cm("recipient create ada@example.com")
    # What a later cm release would leave behind: a revision this code has never heard of.
    with db.get_engine(db_url).begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    db._checked.clear()
    for command in ("recipient list", "group create news"):
        assert_error(cm(command, ok=False), 6, "(0099) is newer than this cm")
    assert_error(cm("db upgrade", ok=False), 6, "cannot migrate", "0099")
    assert cm("db status --json").json()["revision"] == "0099"


def test_a_database_that_is_not_cms_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
    engine.dispose()
    assert_error(make_cm(str(path))("recipient list", ok=False), 6, "no cm schema version", "is this a cm database")


def test_concurrent_first_use_migrates_once(new_db_url: str) -> None:
    # Without the migration lock, first users on PostgreSQL run the same CREATE TABLEs at once, and block or fail.
    # (create=True: as the default location is, on first use.)
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def first_use() -> None:
        try:
            barrier.wait()
            with db.open_session(new_db_url, create=True) as session:
                session.exec(sa.text("SELECT 1"))  # type: ignore[call-overload]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "first use deadlocked"
    assert failures == []
    assert db.current_revision(new_db_url) == db.HEAD_REVISION


def test_concurrent_db_upgrade_processes_create_the_database_once(new_db_url: str, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [str(CM_BIN), "--database", new_db_url, "db", "upgrade"],
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if not k.startswith("CM_")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(proc.wait(timeout=120), proc.communicate()[1]) for proc in procs]
    assert [code for code, _err in results] == [0] * 4, results
    assert sum(f"empty -> {db.HEAD_REVISION}" in err for _code, err in results) == 1, results
    assert db.current_revision(new_db_url) == db.HEAD_REVISION


@pytest.mark.parametrize("write", [True, False], ids=["write", "read"])
def test_sqlite_pragmas(sqlite_url: str, write: bool) -> None:
    with db.open_session(sqlite_url, write=write) as session:
        conn = session.connection()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000


def test_sqlite_foreign_keys_are_enforced(sqlite_url: str) -> None:
    from campaign_manager.models import GroupMember

    db.ensure_schema(sqlite_url)
    member = sa.insert(GroupMember.__table__).values(group_id=1, recipient_id=1, added_at=sa.func.now())  # type: ignore[attr-defined]
    with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"), db.get_engine(sqlite_url).begin() as conn:
        conn.execute(member)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgres://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////abs/cm.db", "sqlite:////abs/cm.db"),
        ("/abs/cm.db", "sqlite:////abs/cm.db"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert db.normalize_url(url) == expected


def test_a_write_that_loses_a_uniqueness_race_is_a_conflict(db_url: str) -> None:
    # The services check names and emails before writing; a row written by another process in between still
    # trips the unique index, which must reach the user as a Conflict (exit 4), not a traceback.
    from campaign_manager.errors import Conflict
    from campaign_manager.models import Group

    with db.open_session(db_url) as session:
        session.add(Group(name="news", name_key="news"))
    with pytest.raises(Conflict, match="conflicts with another"), db.open_session(db_url) as session:
        session.add(Group(name="news", name_key="news"))
        session.flush()


# -- who may create a database ----------------------------------------------------------------------------------

NAMED_COMMANDS = [
    "group list",
    "recipient create ada@example.com",
    "recipient opt-out ada@example.com",
    "campaign list",
    "jobs list",
    "worker --drain",
    "db status",
]


def _name_database(how: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cm:
    """A cm that uses `url`, named by a flag, the environment or the config file."""
    if how == "flag":
        return make_cm(url)
    if how == "env":
        monkeypatch.setenv("CM_DATABASE_URL", url)
    else:
        (tmp_path / "campaign.toml").write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    return make_cm(None)


@pytest.mark.parametrize("command", NAMED_COMMANDS)
@pytest.mark.parametrize("how", ["flag", "env", "file"])
@pytest.mark.parametrize("missing", ["folder", "file"])
def test_a_named_sqlite_database_that_does_not_exist_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, how: str, missing: str
) -> None:
    # A mistyped --database used to create the folders and an empty database, and print an empty table.
    path = tmp_path / "no" / "such" / "cm.db" if missing == "folder" else tmp_path / "typo.db"
    cm = _name_database(how, str(path), tmp_path, monkeypatch)
    assert_error(cm(command, ok=False), 6, f"no cm database at {path}", "cm db upgrade")
    assert {p.name for p in tmp_path.iterdir()} <= {"campaign.toml"}  # no folder, no database, no queue file


def test_db_upgrade_never_creates_the_folder_of_a_named_database(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "cm.db"
    assert_error(make_cm(str(path))("db upgrade", ok=False), 6, f"cannot create the database {path}", "does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.postgres
@pytest.mark.parametrize("command", [c for c in NAMED_COMMANDS if c != "db status"])  # it shows no revision
def test_a_postgres_database_without_cms_tables_is_refused(new_postgres_url: str, command: str) -> None:
    assert_error(make_cm(new_postgres_url)(command, ok=False), 6, "no cm database at postgresql://", "cm db upgrade")
    with db.get_engine(new_postgres_url).connect() as conn:
        assert sa.inspect(conn).get_table_names() == []  # not even the queue's tables


@pytest.mark.parametrize(
    ("args", "config", "code", "message"),
    [
        (["--database", "", "group", "list"], None, 2, "--database is empty"),
        (["--database", " ", "init"], None, 2, "--database is empty"),
        (["init", "--database", ""], None, 2, "--database is empty"),
        (["group", "list"], '[database]\nurl = ""\n', 7, "database.url in"),
    ],
)
def test_an_empty_database_url_is_refused(
    tmp_path: Path, args: list[str], config: str | None, code: int, message: str
) -> None:
    if config is not None:
        (tmp_path / "campaign.toml").write_text(config, encoding="utf-8")
    assert_error(make_cm(None)(args, ok=False), code, message)
    assert {p.name for p in tmp_path.iterdir()} <= {"campaign.toml"}  # not the default database either


def test_init_with_a_database_creates_it_and_names_it_in_the_file(new_db_url: str, tmp_path: Path) -> None:
    cm_bare = make_cm(None)
    run = cm_bare(["init", "--database", new_db_url])
    assert f"ready, at revision {db.HEAD_REVISION}" in run.stderr
    written = tomllib.loads((tmp_path / "campaign.toml").read_text(encoding="utf-8"))
    assert written["database"] == {"url": new_db_url}
    assert all(table == {} for name, table in written.items() if name != "database")  # the rest commented out
    # Every later command finds the database through the file.
    shown = cm_bare("config show --json").json()["settings"]["database.url"]
    assert shown["source"].startswith("file ")
    cm_bare("group create news")
    assert [g["name"] for g in make_cm(new_db_url)("group list --json").json()] == ["news"]


def test_init_with_a_relative_sqlite_path_and_a_missing_folder(tmp_path: Path) -> None:
    cm_bare = make_cm(None)
    assert_error(cm_bare("init --database nowhere/cm.db", ok=False), 6, "the folder", "does not exist")
    assert not (tmp_path / "campaign.toml").exists() and not (tmp_path / "nowhere").exists()
    cm_bare("--database data.db init")  # the global option works too
    assert tomllib.loads((tmp_path / "campaign.toml").read_text())["database"]["url"] == "data.db"
    assert (tmp_path / "data.db").is_file()
    assert cm_bare("db status --json").json()["database"] == f"sqlite:///{tmp_path / 'data.db'}"


# -- a file deleted or replaced under a running process ---------------------------------------------------------


def _replace(path: Path) -> None:
    """Put another cm database at `path`, as a restore from a backup (`mv backup.db cm.db`) would."""
    other = path.with_name("other.db")
    db.upgrade(f"sqlite:///{other}")
    os.replace(other, path)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_under_a_process_is_refused(sqlite_url: str, how: str) -> None:
    from campaign_manager.models import Group

    path = db.sqlite_path(sqlite_url)
    assert path is not None
    with db.open_session(sqlite_url) as session:
        session.add(Group(name="news", name_key="news"))
    if how == "deleted":
        for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            name.unlink(missing_ok=True)
    else:
        _replace(path)

    for write in (True, False):
        gone = pytest.raises(db.DatabaseGone, match="was deleted or replaced while cm was running")
        with gone, db.open_session(sqlite_url, write=write) as session:
            session.add(Group(name="lost", name_key="lost"))
    with pytest.raises(db.DatabaseGone):
        db.connect_sqlite(sqlite_url)
    if how == "deleted":
        assert not path.exists()
    else:
        with sa.create_engine(f"sqlite:///{path}").connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM recipient_group")).scalar() == 0


def test_a_raw_sqlite_connection_never_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(DatabaseError, match="no cm database at"):
        db.connect_sqlite(f"sqlite:///{path}")
    assert not path.exists()
