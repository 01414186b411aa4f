"""Engines, sessions and schema migrations.

SQLite is opened in WAL mode with foreign keys on and a long busy timeout; sessions that write start with
BEGIN IMMEDIATE so that two processes never deadlock upgrading a read lock (SQLite would fail that at once,
whatever the busy timeout). PostgreSQL is reached through psycopg 3.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from campaign_manager.errors import Conflict, DatabaseError, InvalidInput

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlmodel import Session

# The newest migration in migrations/versions; a test checks it against Alembic's own idea of the head.
HEAD_REVISION = "0002"
# A module constant so that a test can play a newer cm release (a copy of these plus one more revision).
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_engines: dict[tuple[str, bool], Engine] = {}
_lock = threading.Lock()
log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and bare SQLite paths; always use psycopg 3 for PostgreSQL."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def is_sqlite(url: str) -> bool:
    return normalize_url(url).startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    url = normalize_url(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///"))
    return None


def display_url(url: str) -> str:
    from campaign_manager.config import mask

    return str(mask("database.url", url))


def _make_engine(url: str, *, write: bool) -> Engine:
    from sqlalchemy import create_engine, event

    url = normalize_url(url)
    if not url.startswith(("sqlite", "postgresql+psycopg")):
        raise DatabaseError(f"unsupported database URL {display_url(url)!r}: use a SQLite path or postgresql://")
    log.debug("opening database %s", display_url(url))
    if not url.startswith("sqlite"):
        # A running job holds up to three connections (its own, the staged file's reader, the lease heartbeat).
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create the folder for {path}: {exc.strerror}") from None
    # No pool limit for SQLite: opening a file is cheap, and a worker with several threads each running a job
    # needs several connections at once (the default pool of 5 + 10 would make the eleventh wait).
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, poolclass=NullPool)
    begin_sql = "BEGIN IMMEDIATE" if write else "BEGIN"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        configure_sqlite(dbapi_conn)
        # SQLite's own lower() folds ASCII only; PostgreSQL's folds all of Unicode. Searches lowercase both
        # sides, so give SQLite Python's lower() to make "ÉMILE" find "Émile" on both backends. (Bulk imports
        # use a connection of their own without it: a Python call per row would hold the GIL.)
        dbapi_conn.create_function("lower", 1, _lower, deterministic=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin_sql)

    return engine


def configure_sqlite(dbapi_conn: Any) -> None:
    """The pragmas every SQLite connection of cm gets. isolation_level None lets us issue BEGIN ourselves
    (pysqlite's own transaction handling defers it past the first write)."""
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def connect_sqlite(url: str) -> Any:
    """A plain sqlite3 connection with cm's pragmas, outside SQLAlchemy (for bulk work on a thread of its own)."""
    import sqlite3

    path = sqlite_path(url)
    if path is None:
        raise DatabaseError("an in-memory SQLite database cannot be shared with another connection")
    conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    configure_sqlite(conn)
    return conn


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def get_engine(url: str, *, write: bool = True) -> Engine:
    """One engine per URL (and per read/write flavour on SQLite), made on first use."""
    key = (normalize_url(url), write and is_sqlite(url))
    with _lock:
        if key not in _engines:
            _engines[key] = _make_engine(url, write=write)
        return _engines[key]


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def open_session(url: str, *, write: bool = True, migrate: bool = True) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; checks (or creates) the schema first."""
    from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
    from sqlmodel import Session

    engine = get_engine(url, write=write)
    try:
        if migrate:
            ensure_schema(url)
        with Session(engine, expire_on_commit=False) as session:
            yield session
            session.commit()
    except IntegrityError as exc:
        # The services check uniqueness first; this is another process writing the same row at the same time.
        raise Conflict(f"the change conflicts with another one: {_first_line(exc)}", hint="try again") from None
    except DataError as exc:
        # The services check every value against `limits` first; this is one they do not know (a bug, but the
        # person still gets a line they can act on rather than the SQL).
        raise InvalidInput(f"the database refused a value: {_first_line(exc)}") from None
    except (OperationalError, ProgrammingError) as exc:
        raise DatabaseError(f"database error on {display_url(url)}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


_checked: set[str] = set()


@contextmanager
def _reaching(url: str) -> Iterator[None]:
    """Turn a database that cannot be reached or opened into a DatabaseError naming it."""
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except OperationalError as exc:
        raise DatabaseError(f"cannot open database {display_url(url)}: {_first_line(exc)}") from None


def current_revision(url: str) -> str | None:
    with _reaching(url), get_engine(url, write=False).connect() as conn:
        return _revision_in(conn)


def _has_tables(url: str) -> bool:
    from sqlalchemy import inspect

    with get_engine(url, write=False).connect() as conn:
        return any(not name.startswith("huey") for name in inspect(conn).get_table_names())


def ensure_schema(url: str) -> None:
    """Create and migrate a new database; refuse one whose schema is older or newer than this code's."""
    if url in _checked:
        return
    with _reaching(url):
        revision = current_revision(url)
        if revision is None:
            if not _has_tables(url):
                upgrade(url)
            # Read again: another process may have created the schema since the first look.
            revision = current_revision(url)
    if revision is None:
        raise DatabaseError(f"{display_url(url)} holds tables but no cm schema version", hint="is this a cm database?")
    if revision != HEAD_REVISION:
        if revision in all_revisions():
            raise DatabaseError(
                f"the database schema is at revision {revision}, this cm needs {HEAD_REVISION}",
                hint="run `cm db upgrade`",
            )
        raise DatabaseError(f"the database schema ({revision}) is newer than this cm; upgrade cm")
    _checked.add(url)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["cm_url"] = url
    return cfg


def all_revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(""))
    return [rev.revision for rev in script.walk_revisions()]


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision`. Safe to run from several processes at once: the migration runs under a lock
    (SQLite's write lock, a PostgreSQL advisory lock) and reads the current revision only once it holds it."""
    from alembic import command
    from alembic.util import CommandError

    engine = get_engine(url)
    with _reaching(url), engine.begin() as conn:
        if not is_sqlite(url):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        before = _revision_in(conn)
        cfg = _alembic_config(url)
        cfg.attributes["connection"] = conn
        try:
            command.upgrade(cfg, revision)
        except CommandError as exc:
            raise DatabaseError(
                f"cannot migrate {display_url(url)}: {exc}", hint="is the database newer than this cm?"
            ) from None
        after = _revision_in(conn)
    if before != after:
        log.info("migrated %s from %s to %s", display_url(url), before or "an empty database", after)
    _checked.discard(url)


# Any constant shared by every cm process; it keeps two first runs from migrating the same database at once.
_MIGRATION_LOCK = 0x636D_6462


def _revision_in(conn: Connection) -> str | None:
    from sqlalchemy import inspect, text

    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
