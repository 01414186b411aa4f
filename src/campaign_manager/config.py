"""Settings: defaults, then campaign.toml, then CM_* environment variables, then command-line flags.

Every value remembers where it came from so that `cm config show` can tell the user.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campaign_manager.errors import ConfigError, InvalidInput

CONFIG_FILENAME = "campaign.toml"
APP_DIR = "campaign-manager"

# key -> (default, type, environment variable, help). The single list of settings: the loader, `cm config show`
# and the test that checks campaign.toml.example all read it.
KEYS: dict[str, tuple[Any, type, str, str]] = {
    "database.url": (None, str, "CM_DATABASE_URL", "SQLite path or URL, or a postgresql:// URL"),
    "queue.url": (None, str, "CM_QUEUE_URL", "Huey storage: SQLite path or URL, postgresql:// or redis://"),
    "queue.name": ("cm", str, "CM_QUEUE_NAME", "queue name, so that several databases can share one server"),
    "worker.workers": (1, int, "CM_WORKER_WORKERS", "threads of a long-running `cm worker`"),
    "worker.retries": (
        3,
        int,
        "CM_WORKER_RETRIES",
        "times a failed job is retried before it is marked failed",
    ),
    "worker.retry_delay": (10.0, float, "CM_WORKER_RETRY_DELAY", "seconds before the first retry"),
    "worker.retry_backoff": (
        2.0,
        float,
        "CM_WORKER_RETRY_BACKOFF",
        "each retry waits this many times longer",
    ),
    "worker.lease_seconds": (
        60.0,
        float,
        "CM_WORKER_LEASE_SECONDS",
        "a running job not heard from this long is retaken",
    ),
    "import.segment_rows": (
        0,
        int,
        "CM_IMPORT_SEGMENT_ROWS",
        "the most rows an import applies per transaction; 0 = automatic (SQLite sizes them to hold its lock ~0.5 s)",
    ),
    "jobs.keep_files_days": (
        7.0,
        float,
        "CM_JOBS_KEEP_FILES_DAYS",
        "days a finished, failed or cancelled job keeps its staged upload before workers purge it",
    ),
    "log.level": ("warning", str, "CM_LOG_LEVEL", "debug, info, warning or error"),
    "log.format": ("text", str, "CM_LOG_FORMAT", "text or json (one JSON object a line, on stderr)"),
}
SECRET_WORDS = ("password", "secret", "token")


@dataclass
class Settings:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    config_file: Path | None = None
    # Things a person should hear about once per command (the CLI logs them): a world-readable file of secrets.
    warnings: list[str] = field(default_factory=list)

    def get(self, key: str) -> Any:
        return self.values[key]

    @property
    def database_url(self) -> str:
        return str(self.values["database.url"])

    @property
    def database_is_default(self) -> bool:
        """The database is the default location, which any command creates on first use; one that was named
        (file, environment, --database) is created only by `cm db upgrade` or `cm init --database`."""
        return self.sources["database.url"] == "default"

    @property
    def queue_url(self) -> str:
        return str(self.values["queue.url"])


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / APP_DIR


def find_config_file(explicit: str | None) -> Path | None:
    """--config, else $CM_CONFIG, else ./campaign.toml, else $XDG_CONFIG_HOME/campaign-manager/campaign.toml."""
    if explicit or os.environ.get("CM_CONFIG"):
        path = Path(explicit or os.environ["CM_CONFIG"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    local = Path(CONFIG_FILENAME)
    if local.is_file():
        return local
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    user = Path(xdg) / APP_DIR / CONFIG_FILENAME
    return user if user.is_file() else None


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = KEYS[key][1]
    try:
        if kind is int and isinstance(value, str | int) and not isinstance(value, bool):
            return int(value)
        if kind is float and isinstance(value, str | int | float) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    raise ConfigError(f"{key} from {source} must be {kind.__name__}, got {value!r}")


def resolve_url(value: str, base: Path) -> str:
    """A bare path or sqlite:/// URL made absolute against `base`; other URLs unchanged."""
    if "://" in value and not value.startswith("sqlite:"):
        return value
    path = value.removeprefix("sqlite:///") if value.startswith("sqlite:///") else value
    if path == ":memory:" or (value.startswith("sqlite://") and not value.startswith("sqlite:///")):
        return value
    resolved = (base / Path(path).expanduser()).resolve()
    return f"sqlite:///{resolved}"


def load_settings(config: str | None = None, flags: dict[str, Any] | None = None) -> Settings:
    settings = Settings()
    for key, (default, *_rest) in KEYS.items():
        settings.values[key] = default
        settings.sources[key] = "default"

    path = find_config_file(config)
    if path is not None:
        settings.config_file = path.resolve()
        try:
            raw = _flatten(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, value in raw.items():
            if key not in KEYS:
                raise ConfigError(f"unknown key {key!r} in {path}", hint="see campaign.toml.example")
            source = f"file {settings.config_file}"
            value = _coerce(key, value, source)
            if key in ("database.url", "queue.url"):
                if not value.strip():
                    raise ConfigError(f"{key} in {path} is empty", hint="give a path or a URL, or remove the key")
                value = resolve_url(value, settings.config_file.parent)
            settings.values[key], settings.sources[key] = value, source
        settings.warnings += _exposed_secrets(settings.config_file, raw)

    for key, (_default, _kind, env, _help) in KEYS.items():
        if env in os.environ and os.environ[env] != "":
            value = _coerce(key, os.environ[env], env)
            if key in ("database.url", "queue.url"):
                value = resolve_url(value, Path.cwd())
            settings.values[key], settings.sources[key] = value, f"env {env}"

    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key in ("database.url", "queue.url"):
            if not str(value).strip():
                # An empty path would resolve to the working folder: refuse it rather than guess.
                name = "--database" if key == "database.url" else key
                raise InvalidInput(f"{name} is empty", hint="give a SQLite path or a URL")
            value = resolve_url(value, Path.cwd())
        settings.values[key], settings.sources[key] = value, "flag"

    if settings.values["database.url"] is None:
        settings.values["database.url"] = f"sqlite:///{data_dir() / 'cm.db'}"
    if settings.values["queue.url"] is None:
        settings.values["queue.url"] = default_queue_url(settings.values["database.url"])
        settings.sources["queue.url"] = "default (beside the database)"
    if settings.values["log.format"] not in ("text", "json"):
        raise ConfigError(f"log.format must be text or json, got {settings.values['log.format']!r}")
    if settings.values["log.level"].lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log.level must be debug, info, warning or error, got {settings.values['log.level']!r}"
            f" (from {settings.sources['log.level']})"
        )
    return settings


def _exposed_secrets(path: Path, raw: dict[str, Any]) -> list[str]:
    """A warning if the file holds a secret (a value `mask` hides) and every local user may read it. Group-readable
    is fine: a systemd unit's group may need to read the file."""
    if not any(mask(key, value) != value for key, value in raw.items()):
        return []
    try:
        readable_by_all = bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return []
    if not readable_by_all:
        return []
    return [f"{path} holds a password and every user of this machine can read it (chmod o-r {path})"]


def default_queue_url(database_url: str) -> str:
    """SQLite databases get a queue file beside them; a PostgreSQL database holds the queue's tables itself."""
    if database_url.startswith("sqlite:///"):
        db_path = Path(database_url.removeprefix("sqlite:///"))
        return f"sqlite:///{db_path.with_name(db_path.stem + '-queue.db')}"
    return database_url


def mask(key: str, value: Any) -> Any:
    """Hide passwords: whole values of secret keys, and the password part of URLs."""
    if value is None:
        return None
    if any(word in key for word in SECRET_WORDS):
        return "********"
    text = str(value)
    if "://" in text and "@" in text:
        scheme, rest = text.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":********"
        return f"{scheme}://{creds}@{host}"
    return value


def render_example(*, database_url: str | None = None) -> str:
    """campaign.toml.example, made from KEYS so that it documents every key (a test compares the file). With
    `database_url`, the starter file of `cm init --database`: that one key is set."""
    lines = [
        "# cm configuration. Every key is optional; CM_* environment variables override this file and",
        "# command-line flags override both. Relative SQLite paths are relative to this file.",
        "# `cm config show` prints the effective values and where each came from.",
    ]
    section = ""
    for key, (default, _kind, env, help_) in KEYS.items():
        table, name = key.split(".", 1)
        if table != section:
            lines += ["", f"[{table}]"]
            section = table
        lines.append(f"# {help_} (env {env})")
        if default is None:
            example = {
                "database.url": '"cm.db"  # default: $XDG_DATA_HOME/campaign-manager/cm.db',
                "queue.url": '"cm-queue.db"  # default: beside the database (SQLite) or in it (PostgreSQL)',
            }[key]
            lines.append(f"# {name} = {example}")
            if key == "database.url" and database_url is not None:
                lines.append(f"{name} = {toml_string(database_url)}")
        else:
            value = f'"{default}"' if isinstance(default, str) else repr(default)
            lines.append(f"# {name} = {value}")
    return "\n".join(lines) + "\n"


def toml_string(value: str) -> str:
    """`value` as a TOML basic string. JSON's escapes are TOML's, except that TOML also wants DEL escaped."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
