"""Engines, sessions and schema migrations.

SQLite is opened in WAL mode with foreign keys on and a long busy timeout; sessions that write start with
BEGIN IMMEDIATE so that two processes never deadlock upgrading a read lock (SQLite would fail that at once,
whatever the busy timeout). PostgreSQL is reached through psycopg 3.

Only the creation path makes a database: `upgrade` (`cm db upgrade`, `cm init --database`), and `ensure_schema`
with create=True (the default location, made on first use). Everything else opens SQLite files in SQLite's
`mode=rw`, which refuses to create a missing file, and refuses a PostgreSQL database without cm's tables, so that
a mistyped path never becomes a new, empty database that commands then happily write into. A SQLite file is
also remembered by its identity (device and inode) on first connect: a file deleted or replaced under a running
process is refused rather than quietly recreated.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from campaign_manager.config import mask
from campaign_manager.errors import Conflict, DatabaseError, InvalidInput
from campaign_manager.files import create_private, create_private_dir

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlmodel import Session

    from campaign_manager.config import Settings

# The newest migration in migrations/versions; a test checks it against Alembic's own idea of the head.
HEAD_REVISION = "0004"
# A module constant so that a test can play a newer cm release (a copy of these plus one more revision).
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_engines: dict[tuple[str, bool, bool], Engine] = {}
_lock = threading.Lock()
_identities: dict[Path, tuple[int, int]] = {}  # SQLite file -> (st_dev, st_ino) when this process first opened it
log = logging.getLogger(__name__)
CREATE_HINT = "create it with `cm db upgrade`"


class DatabaseUnavailable(DatabaseError):
    """The database cannot be written or reached right now (read-only, gone away, an I/O error): a fault of the
    infrastructure, not of what was asked of it. A worker hands its job back and tries again later."""


class DatabaseGone(DatabaseError):
    """The SQLite file this process opened was deleted or replaced: whatever is at that path now is not the
    database the process was working in. A worker stops."""


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
    return str(mask("database.url", url))


def _make_engine(url: str, *, write: bool, kept: bool = False) -> Engine:
    from sqlalchemy import create_engine, event

    url = normalize_url(url)
    if not url.startswith(("sqlite", "postgresql+psycopg")):
        raise DatabaseError(f"unsupported database URL {display_url(url)!r}: use a SQLite path or postgresql://")
    log.debug("opening database %s", display_url(url))
    if not url.startswith("sqlite"):
        # A running job holds up to three connections (its own, the staged file's reader, the lease heartbeat).
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    path = sqlite_path(url)
    # No pool limit for SQLite: opening a file is cheap, and a worker with several threads each running a job
    # needs several connections at once (the default pool of 5 + 10 would make the eleventh wait).
    from sqlalchemy.pool import NullPool, SingletonThreadPool

    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        poolclass=SingletonThreadPool if kept else NullPool,
    )
    begin_sql = "BEGIN IMMEDIATE" if write else "BEGIN"

    if path is not None:
        file = path

        @event.listens_for(engine, "do_connect")
        def _on_do_connect(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
            # NullPool: every session connects, so every session checks that the file is still the one it was.
            cargs[0] = sqlite_uri(file)
            cparams["uri"] = True

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
    conn = sqlite3.connect(sqlite_uri(path), uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    configure_sqlite(conn)
    return conn


def sqlite_uri(path: Path) -> str:
    """The URI that opens the existing file at `path` for reading and writing, never creating it (after checking
    that it is the file this process first opened there)."""
    check_file(path)
    return f"file:{quote(str(path))}?mode=rw"


def check_file(path: Path) -> None:
    """DatabaseError if there is no file at `path`; DatabaseGone if it is not the file this process first found
    there (deleted, or replaced by another)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        if path in _identities:
            raise _gone(path) from None
        raise DatabaseError(f"no cm database at {path}", hint=CREATE_HINT) from None
    except OSError as exc:
        raise DatabaseUnavailable(f"cannot open database {path}: {exc.strerror}") from None
    identity = (stat.st_dev, stat.st_ino)
    if _identities.setdefault(path, identity) != identity:
        raise _gone(path)


def _gone(path: Path) -> DatabaseGone:
    return DatabaseGone(
        f"the database file {path} was deleted or replaced while cm was running",
        hint="start cm again once the right file is in place",
    )


def check_database(url: str) -> None:
    """For a long-running process: DatabaseGone if its SQLite file was deleted or replaced since it first opened
    it (a cheap stat; nothing for PostgreSQL)."""
    path = sqlite_path(url)
    if path is not None and path in _identities:
        check_file(path)


def create_database(url: str, *, make_folder: bool = False) -> None:
    """Make a new SQLite file (0600, so that its -wal and -shm files are 0600 too) unless it exists. Its folder
    is created (0700) only with `make_folder` (the default location); a folder someone named must exist. A
    PostgreSQL database must exist already: nothing to do."""
    path = sqlite_path(url)
    if path is None or path.exists():
        return
    if not path.parent.is_dir():
        if not make_folder:
            raise DatabaseError(f"cannot create the database {path}: the folder {path.parent} does not exist")
        try:
            create_private_dir(path.parent)
        except OSError as exc:
            raise DatabaseError(f"cannot create the folder {path.parent}: {exc.strerror}") from None
    try:
        create_private(path)
    except OSError as exc:
        raise DatabaseError(f"cannot create the database {path}: {exc.strerror}") from None


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def get_engine(url: str, *, write: bool = True, kept: bool = False) -> Engine:
    """One engine per URL (and per read/write flavour on SQLite), made on first use. `kept`: on SQLite, each
    thread keeps its connection open between sessions (for a loop that commits often from one thread: a sender),
    where cm otherwise connects per session; closing the last connection to a WAL file checkpoints it, which cost
    a sender more than its writes."""
    sqlite = is_sqlite(url)
    key = (normalize_url(url), write and sqlite, kept and sqlite)
    with _lock:
        if key not in _engines:
            _engines[key] = _make_engine(url, write=write, kept=kept and sqlite)
        return _engines[key]


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _identities.clear()


def discard_connections(url: str) -> None:
    """Close the pooled connections to `url`, so that the next use connects afresh: after a fault, a pooled
    PostgreSQL connection may be dead, or still carry a session made while the database was read-only."""
    key = normalize_url(url)
    with _lock:
        engines = [engine for (name, _write, _kept), engine in _engines.items() if name == key]
    for engine in engines:
        engine.dispose()


@contextmanager
def open_session(
    url: str, *, write: bool = True, migrate: bool = True, create: bool = False, kept: bool = False
) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; checks the schema first (see ensure_schema
    for `create`). `kept`: see get_engine."""
    from sqlalchemy.exc import DataError, IntegrityError, InternalError, OperationalError, ProgrammingError
    from sqlmodel import Session

    engine = get_engine(url, write=write, kept=kept)
    try:
        if migrate:
            ensure_schema(url, create=create)
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
        raise _database_error(f"database error on {display_url(url)}", exc) from None
    except InternalError as exc:
        # PostgreSQL's read-only transaction error arrives as an InternalError; any other stays as it was.
        if not is_unavailable(exc):
            raise
        raise _database_error(f"database error on {display_url(url)}", exc) from None


def settings_session(settings: Settings, *, write: bool = True) -> AbstractContextManager[Session]:
    """open_session on the settings' database; the default database (and only it) is created on first use."""
    return open_session(settings.database_url, write=write, create=settings.database_is_default)


def _database_error(prefix: str, exc: BaseException) -> DatabaseError:
    kind = DatabaseUnavailable if is_unavailable(exc) else DatabaseError
    return kind(f"{prefix}: {_first_line(exc)}")


# SQLite result codes (sqlite3.Error.sqlite_errorname, extended codes included) and PostgreSQL SQLSTATEs that say
# the database cannot be written or reached, rather than that a statement was wrong.
_SQLITE_FAULTS = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")
_SQLITE_FAULT_TEXTS = ("attempt to write a readonly database", "disk i/o error", "unable to open database file")
_POSTGRES_FAULTS = ("08", "25006", "57P01", "57P02", "57P03", "58030")  # connection; read-only; shutdown; I/O


def is_unavailable(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) says the database cannot be written or reached right now: read-only,
    gone away, shut down, an I/O error. Such a fault is the infrastructure's, not the work's."""
    import sqlite3

    import psycopg

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DatabaseUnavailable):
            return True
        if isinstance(exc, sqlite3.Error):
            name = str(getattr(exc, "sqlite_errorname", ""))
            if name.startswith(_SQLITE_FAULTS) or str(exc).lower().startswith(_SQLITE_FAULT_TEXTS):
                return True
        if isinstance(exc, psycopg.Error):
            # No SQLSTATE: the client lost (or never had) its connection.
            if exc.sqlstate is None and isinstance(exc, psycopg.OperationalError):
                return True
            if exc.sqlstate is not None and exc.sqlstate.startswith(_POSTGRES_FAULTS):
                return True
        cause = getattr(exc, "orig", None) or exc.__cause__
        exc = cause if cause is not None else (None if exc.__suppress_context__ else exc.__context__)
    return False


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
        raise _database_error(f"cannot open database {display_url(url)}", exc) from None


def _where(url: str) -> str:
    path = sqlite_path(url)
    return str(path) if path is not None else display_url(url)


def current_revision(url: str) -> str | None:
    with _reaching(url), get_engine(url, write=False).connect() as conn:
        return _revision_in(conn)


def _has_tables(url: str) -> bool:
    from sqlalchemy import inspect

    with get_engine(url, write=False).connect() as conn:
        return any(not name.startswith("huey") for name in inspect(conn).get_table_names())


def ensure_schema(url: str, *, create: bool = False) -> None:
    """Refuse a database whose schema is older or newer than this code's, and one that does not exist (a missing
    SQLite file, a PostgreSQL database without cm's tables) unless `create`: only the default location is made on
    first use (its folder too); a database someone named is made by `cm db upgrade`."""
    if url in _checked:
        return
    if create:
        create_database(url, make_folder=True)
    with _reaching(url):
        revision = current_revision(url)
        if revision is None:
            if not _has_tables(url):
                if not create:
                    raise DatabaseError(f"no cm database at {_where(url)}", hint=CREATE_HINT)
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


def upgrade(url: str, revision: str = "head", *, make_folder: bool = False) -> str | None:
    """Create the database if it is new (see create_database for `make_folder`) and migrate it to `revision`;
    returns the revision it was at (None: a new database). Safe to run from several processes at once: the
    migration runs under a lock (SQLite's write lock, a PostgreSQL advisory lock) and reads the current revision
    only once it holds it."""
    from alembic import command
    from alembic.util import CommandError

    create_database(url, make_folder=make_folder)
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
    return before


# Any constant shared by every cm process; it keeps two first runs from migrating the same database at once.
_MIGRATION_LOCK = 0x636D_6462


def _revision_in(conn: Connection) -> str | None:
    from sqlalchemy import inspect, text

    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
