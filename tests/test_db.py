"""The database: created and migrated on first use, migrations that match the models exactly (SQLite and
PostgreSQL), `cm db status/upgrade`, a schema behind or ahead of the code, and SQLite's pragmas."""

from __future__ import annotations

import shutil
import threading
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
from conftest import Run, assert_error, make_cm

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


def test_a_new_sqlite_database_is_created_and_migrated_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "cm.db"
    cm = make_cm(str(path))
    assert cm("recipient list --json").json() == []  # even a read creates it
    assert path.is_file()
    status = cm("db status --json").json()
    assert status == {
        "database": f"sqlite:///{path}",
        "revision": db.HEAD_REVISION,
        "head": db.HEAD_REVISION,
        "up_to_date": True,
    }


def test_db_status_and_upgrade(db_url: str) -> None:
    cm = make_cm(db_url)
    before = cm("db status --json").json()
    assert (before["revision"], before["head"], before["up_to_date"]) == (None, db.HEAD_REVISION, False)
    upgraded = cm("db upgrade")
    assert f"empty -> {db.HEAD_REVISION}" in upgraded.stderr
    assert cm("db status --json").json()["up_to_date"] is True
    assert f"revision: {db.HEAD_REVISION}" in cm("db status").stdout
    cm("db upgrade")  # again: nothing to do, still fine
    assert _tables(db_url) >= set(SQLModel.metadata.tables)


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


def test_concurrent_first_use_migrates_once(db_url: str) -> None:
    # Without the migration lock, first users on PostgreSQL run the same CREATE TABLEs at once, and block or fail.
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def first_use() -> None:
        try:
            barrier.wait()
            with db.open_session(db_url) as session:
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
    assert db.current_revision(db_url) == db.HEAD_REVISION


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
