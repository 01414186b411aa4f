"""cm's own settings: one class a table of campaign.toml, one field a key (see `keys`). `config` reads them; this is
the single list of cm's keys (the loader, `cm config show`, campaign.toml.example and the README's table all follow
it).

NamedTuples, and no `from __future__ import annotations`: every command loads this module, and a NamedTuple with
its annotations as objects costs a tenth of a frozen dataclass to define.
"""

from pathlib import Path
from typing import Annotated, NamedTuple

from campaign_manager.keys import Key, declared, key


class DatabaseSettings(NamedTuple):
    url: Annotated[
        str,
        key(
            "SQLite path or URL, or a postgresql:// URL",
            env="CM_DATABASE_URL",
            example='"cm.db"  # default: $XDG_DATA_HOME/campaign-manager/cm.db',
        ),
    ] = ""  # not set: load_settings works it out (in the data folder)


class QueueSettings(NamedTuple):
    url: Annotated[
        str,
        key(
            "Huey storage: SQLite path or URL, postgresql:// or redis://",
            env="CM_QUEUE_URL",
            example='"cm-queue.db"  # default: beside the database (SQLite) or in it (PostgreSQL)',
        ),
    ] = ""  # not set: load_settings works it out (from the database's)
    name: Annotated[str, key("queue name, so that several databases can share one server", env="CM_QUEUE_NAME")] = "cm"


class WorkerSettings(NamedTuple):
    workers: Annotated[int, key("threads of a long-running `cm worker`", env="CM_WORKER_WORKERS")] = 1
    retries: Annotated[
        int, key("times a failed job is retried before it is marked failed", env="CM_WORKER_RETRIES")
    ] = 3
    retry_delay: Annotated[float, key("seconds before the first retry", env="CM_WORKER_RETRY_DELAY")] = 10.0
    retry_backoff: Annotated[float, key("each retry waits this many times longer", env="CM_WORKER_RETRY_BACKOFF")] = 2.0
    lease_seconds: Annotated[
        float, key("a running job not heard from this long is retaken", env="CM_WORKER_LEASE_SECONDS")
    ] = 60.0


class ImportSettings(NamedTuple):
    segment_rows: Annotated[
        int,
        key(
            "the most rows an import applies per transaction; 0 = automatic (sized to hold the locks ~0.5 s on"
            " SQLite, ~0.3 s on PostgreSQL)",
            env="CM_IMPORT_SEGMENT_ROWS",
        ),
    ] = 0


class JobsSettings(NamedTuple):
    keep_files_days: Annotated[
        float,
        key(
            "days a finished, failed or cancelled job keeps its staged upload before workers purge it",
            env="CM_JOBS_KEEP_FILES_DAYS",
        ),
    ] = 7.0


class LogSettings(NamedTuple):
    level: Annotated[str, key("debug, info, warning or error", env="CM_LOG_LEVEL")] = "warning"
    format: Annotated[str, key("text or json (one JSON object a line, on stderr)", env="CM_LOG_FORMAT")] = "text"


class SendSettings(NamedTuple):
    notifier: Annotated[
        str,
        key(
            "required to send: email, outbox, webhook or a plugin's name (`cm plugins`); no default, so a missing"
            " setting never sends a campaign somewhere unintended",
            env="CM_SEND_NOTIFIER",
            example='"email"',
        ),
    ] = ""
    from_: Annotated[
        str,
        key(
            "the From of every message, unless a campaign has its own",
            env="CM_SEND_FROM",
            example='"News <news@example.com>"',
        ),
    ] = ""
    max_attempts: Annotated[
        int, key("attempts at one delivery before it is marked failed", env="CM_SEND_MAX_ATTEMPTS")
    ] = 5
    retry_delay: Annotated[
        float,
        key(
            "seconds before a delivery's first retry; each later one waits twice as long (at most max_delay)",
            env="CM_SEND_RETRY_DELAY",
        ),
    ] = 60.0
    max_delay: Annotated[
        float,
        key(
            "seconds; a scheduled send found later than this is paused (reason `late`), not started",
            env="CM_SEND_MAX_DELAY",
        ),
    ] = 21600.0
    max_outage: Annotated[
        float,
        key("seconds the notifier may be down before the campaign pauses", env="CM_SEND_MAX_OUTAGE"),
    ] = 21600.0
    record_batch: Annotated[
        int, key("results are recorded at least every this many messages ...", env="CM_SEND_RECORD_BATCH")
    ] = 100
    record_interval: Annotated[float, key("... or every this many seconds", env="CM_SEND_RECORD_INTERVAL")] = 0.2
    claim_batch: Annotated[
        int,
        key(
            "deliveries a worker claims at once; an opt-out is honoured by every batch claimed after it commits",
            env="CM_SEND_CLAIM_BATCH",
        ),
    ] = 500
    max_message_bytes: Annotated[
        int, key("a rendered message larger than this fails rather than being sent", env="CM_SEND_MAX_MESSAGE_BYTES")
    ] = 10_000_000


class UnsubscribeSettings(NamedTuple):
    mailto: Annotated[
        str,
        key(
            "the address of the List-Unsubscribe mailto: link (its subject carries the token)",
            env="CM_UNSUBSCRIBE_MAILTO",
            example='"unsubscribe@example.com"',
        ),
    ] = ""
    url: Annotated[
        str,
        key(
            "the one-click unsubscribe link; must contain {token} (`cm serve` answers it); not set while"
            " serve.base_url is: {serve.base_url}/u/{token}",
            env="CM_UNSUBSCRIBE_URL",
            example='"https://example.com/u/{token}"',
        ),
    ] = ""
    secret: Annotated[
        str,
        key(
            "signs the tokens; not set: a secret made for the database when it was created",
            env="CM_UNSUBSCRIBE_SECRET",
            secret=True,
        ),
    ] = ""
    old_secrets: Annotated[
        tuple[str, ...],
        key(
            "secrets that signed earlier links: still accepted when a token is checked, never used to sign",
            env="CM_UNSUBSCRIBE_OLD_SECRETS",
            secret=True,
        ),
    ] = ()


class ServeSettings(NamedTuple):
    host: Annotated[str, key("the address `cm serve` listens on", env="CM_SERVE_HOST")] = "127.0.0.1"
    port: Annotated[int, key("the port `cm serve` listens on", env="CM_SERVE_PORT")] = 8000
    threads: Annotated[int, key("threads that answer requests; 0: 4 per core, at least 8", env="CM_SERVE_THREADS")] = 0
    base_url: Annotated[
        str,
        key(
            "the public https address of `cm serve`, as people reach it (links in messages are built on it)",
            env="CM_SERVE_BASE_URL",
            example='"https://lists.example.com"',
        ),
    ] = ""
    templates: Annotated[
        Path | None,
        key(
            "a folder of page and confirmation-message templates that replace the built-in ones of the same name",
            env="CM_SERVE_TEMPLATES",
            example='"pages"',
        ),
    ] = None
    double_opt_in: Annotated[
        bool,
        key("a sign-up is active only once the person follows the link mailed to them", env="CM_SERVE_DOUBLE_OPT_IN"),
    ] = True
    confirm_days: Annotated[
        int,
        key("days a confirmation link works; unconfirmed sign-ups are deleted after them", env="CM_SERVE_CONFIRM_DAYS"),
    ] = 7
    subscribe_rate: Annotated[
        int, key("sign-ups accepted per client IP address per hour (0: no limit)", env="CM_SERVE_SUBSCRIBE_RATE")
    ] = 10
    trusted_proxies: Annotated[
        tuple[str, ...],
        key(
            "proxies (addresses or networks) whose X-Forwarded-For gives the client's address",
            env="CM_SERVE_TRUSTED_PROXIES",
            example='["127.0.0.1", "::1"]',
        ),
    ] = ()
    api_token: Annotated[
        str,
        key(
            "the bearer token of the REST API; not set: the API and its docs are off",
            env="CM_API_TOKEN",
            secret=True,
        ),
    ] = ""


# table of campaign.toml -> its section. Settings has an attribute for each, named alike except `imports`
# (`import` is a Python keyword).
SECTIONS: dict[str, type] = {
    "database": DatabaseSettings,
    "queue": QueueSettings,
    "worker": WorkerSettings,
    "import": ImportSettings,
    "jobs": JobsSettings,
    "log": LogSettings,
    "send": SendSettings,
    "unsubscribe": UnsubscribeSettings,
    "serve": ServeSettings,
}
# Every key of cm's own tables, by dotted name.
KEYS: dict[str, Key] = {f"{table}.{k.name}": k for table, cls in SECTIONS.items() for k in declared(cls)}
