"""cm's own settings: one frozen dataclass a table of campaign.toml, one field a key (see `keys`). `config` reads
them; this is the single list of cm's keys (the loader, `cm config show`, campaign.toml.example and the README's
table all follow it)."""

from __future__ import annotations

from dataclasses import dataclass

from campaign_manager.keys import Key, declared, key


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = key(
        None,
        env="CM_DATABASE_URL",
        help="SQLite path or URL, or a postgresql:// URL",
        example='"cm.db"  # default: $XDG_DATA_HOME/campaign-manager/cm.db',
    )


@dataclass(frozen=True)
class QueueSettings:
    url: str = key(
        None,
        env="CM_QUEUE_URL",
        help="Huey storage: SQLite path or URL, postgresql:// or redis://",
        example='"cm-queue.db"  # default: beside the database (SQLite) or in it (PostgreSQL)',
    )
    name: str = key("cm", env="CM_QUEUE_NAME", help="queue name, so that several databases can share one server")


@dataclass(frozen=True)
class WorkerSettings:
    workers: int = key(1, env="CM_WORKER_WORKERS", help="threads of a long-running `cm worker`")
    retries: int = key(3, env="CM_WORKER_RETRIES", help="times a failed job is retried before it is marked failed")
    retry_delay: float = key(10.0, env="CM_WORKER_RETRY_DELAY", help="seconds before the first retry")
    retry_backoff: float = key(2.0, env="CM_WORKER_RETRY_BACKOFF", help="each retry waits this many times longer")
    lease_seconds: float = key(
        60.0, env="CM_WORKER_LEASE_SECONDS", help="a running job not heard from this long is retaken"
    )


@dataclass(frozen=True)
class ImportSettings:
    segment_rows: int = key(
        0,
        env="CM_IMPORT_SEGMENT_ROWS",
        help="the most rows an import applies per transaction; 0 = automatic (SQLite sizes them to hold its lock"
        " ~0.5 s)",
    )


@dataclass(frozen=True)
class JobsSettings:
    keep_files_days: float = key(
        7.0,
        env="CM_JOBS_KEEP_FILES_DAYS",
        help="days a finished, failed or cancelled job keeps its staged upload before workers purge it",
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = key("warning", env="CM_LOG_LEVEL", help="debug, info, warning or error")
    format: str = key("text", env="CM_LOG_FORMAT", help="text or json (one JSON object a line, on stderr)")


# table of campaign.toml -> its section. Settings has an attribute for each, named alike except `imports`
# (`import` is a Python keyword).
SECTIONS: dict[str, type] = {
    "database": DatabaseSettings,
    "queue": QueueSettings,
    "worker": WorkerSettings,
    "import": ImportSettings,
    "jobs": JobsSettings,
    "log": LogSettings,
}
# Every key of cm's own tables, by dotted name: the loader, `cm config show`, the example file and the README
# test all read this.
KEYS: dict[str, Key] = {f"{table}.{k.name}": k for table, cls in SECTIONS.items() for k in declared(cls)}
