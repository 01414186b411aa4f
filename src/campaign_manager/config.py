"""Settings: defaults, then campaign.toml, then CM_* environment variables, then command-line flags.

Each table of the file is a typed section (a frozen dataclass declared in `sections`), built and checked once
by `load_settings`: callers read `settings.worker.retries`, an int. Every value remembers where it came from, so
that `cm config show` can tell the user. `[notifiers.NAME]` tables belong to the notifier plugins, which declare
their keys the same way (see `campaign_manager.notifiers`).
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from campaign_manager.errors import ConfigError, InvalidInput
from campaign_manager.keys import Key, build, coerce, declared, read_table, toml_value
from campaign_manager.sections import (
    KEYS,
    SECTIONS,
    DatabaseSettings,
    ImportSettings,
    JobsSettings,
    LogSettings,
    QueueSettings,
    SendSettings,
    ServeSettings,
    UnsubscribeSettings,
    WorkerSettings,
)

CONFIG_FILENAME = "campaign.toml"
APP_DIR = "campaign-manager"
_URLS = ("database.url", "queue.url")
NOTIFIERS = "notifiers"


def _attribute(table: str) -> str:
    return "imports" if table == "import" else table


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings
    queue: QueueSettings
    worker: WorkerSettings
    imports: ImportSettings  # the [import] table
    jobs: JobsSettings
    log: LogSettings
    send: SendSettings
    unsubscribe: UnsubscribeSettings
    serve: ServeSettings
    # dotted key -> where its value came from: "default", "file PATH", "env NAME", "flag".
    sources: dict[str, str] = field(default_factory=dict)
    config_file: Path | None = None
    # Things a person should hear about once per command (the CLI logs them): a world-readable file of secrets,
    # the table of a notifier that is not installed.
    warnings: list[str] = field(default_factory=list)
    # The file's [notifiers.NAME] tables, as read (checked against the notifiers' declarations by `notifiers`).
    notifier_tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.database.url

    @property
    def database_is_default(self) -> bool:
        """The database is the default location, which any command creates on first use; one that was named
        (file, environment, --database) is created only by `cm db upgrade` or `cm init --database`."""
        return self.sources["database.url"] == "default"

    @property
    def queue_url(self) -> str:
        return self.queue.url

    @property
    def notifiers(self) -> dict[str, Any]:
        """name -> the settings of each installed notifier (an instance of its `config_class`), from its
        declared defaults, its table in the file and its environment variables. Read on first use (at load, when
        the file has [notifiers.NAME] tables), since it loads the plugins: a command that sends nothing does not
        pay for that. Raises ConfigError for an unknown key or a value of the wrong type."""
        return dict(self._notifier_settings[0])

    @property
    def notifier_sources(self) -> dict[str, str]:
        """`sources` for the notifiers' keys (`notifiers.NAME.KEY`)."""
        return dict(self._notifier_settings[1])

    @cached_property
    def _notifier_settings(self) -> tuple[dict[str, Any], dict[str, str]]:
        # Imported here, like the plugins themselves: a command that neither sends nor shows the settings (most
        # of them) does without the notifier contract (~2 ms of start-up).
        from campaign_manager.notifiers import config_class, load_notifiers

        configs: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, cls in sorted(load_notifiers().items()):
            declaration = config_class(cls)
            table = self.notifier_tables.get(name, {})
            values = read_table(declaration, f"{NOTIFIERS}.{name}", table, file=self.config_file, sources=sources)
            configs[name] = build(declaration, values)
        return configs, sources

    def values(self) -> dict[str, Any]:
        """Every key of cm's own tables, by dotted name."""
        return {name: getattr(getattr(self, _attribute(name.split(".")[0])), k.attribute) for name, k in KEYS.items()}


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
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def resolve_url(value: str, base: Path) -> str:
    """A bare path or sqlite:/// URL made absolute against `base`; other URLs unchanged."""
    if "://" in value and not value.startswith("sqlite:"):
        return value
    path = value.removeprefix("sqlite:///") if value.startswith("sqlite:///") else value
    if path == ":memory:" or (value.startswith("sqlite://") and not value.startswith("sqlite:///")):
        return value
    resolved = (base / Path(path).expanduser()).resolve()
    return f"sqlite:///{resolved}"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_settings(config: str | None = None, flags: Mapping[str, Any] | None = None) -> Settings:
    """The settings of this run: `config` is --config (else the file is looked for), `flags` values given on the
    command line by dotted key (None: not given). Raises ConfigError (exit 7) for a bad file or value."""
    path = find_config_file(config)
    file = path.resolve() if path is not None else None
    raw = _read_file(path) if path is not None else {}
    tables: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        if (name in SECTIONS and isinstance(value, dict)) or name == NOTIFIERS:
            tables[name] = value
        else:
            unknown = next(iter(_flatten({name: value})), name)  # `[databse] url = ...` is 'databse.url'
            raise ConfigError(f"unknown key {unknown!r} in {file}", hint="see campaign.toml.example")

    sources: dict[str, str] = {}
    values: dict[str, dict[str, Any]] = {}
    for table, cls in SECTIONS.items():
        values[table] = read_table(cls, table, tables.get(table, {}), file=file, sources=sources)
    for dotted in _URLS:
        table, name = dotted.split(".")
        value, source = values[table][name], sources[dotted]
        if source.startswith("file ") and not value.strip():
            raise ConfigError(f"{dotted} in {file} is empty", hint="give a path or a URL, or remove the key")
        if value:
            values[table][name] = resolve_url(value, file.parent if source.startswith("file ") and file else Path.cwd())
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        table, name = dotted.split(".")
        if dotted in _URLS:
            if not str(value).strip():
                # An empty path would resolve to the working folder: refuse it rather than guess.
                raise InvalidInput(
                    f"{'--database' if table == 'database' else dotted} is empty", hint="give a SQLite path or a URL"
                )
            value = resolve_url(value, Path.cwd())
        values[table][name] = coerce(KEYS[dotted], value, name=dotted, source="a flag")
        sources[dotted] = "flag"
    if not values["database"]["url"]:
        values["database"]["url"] = f"sqlite:///{data_dir() / 'cm.db'}"
    if not values["queue"]["url"]:
        values["queue"]["url"] = default_queue_url(values["database"]["url"])
        sources["queue.url"] = "default (beside the database)"
    _check_log(values["log"], sources)
    _serve_links(values, sources)

    settings = Settings(
        **{_attribute(table): build(cls, values[table]) for table, cls in SECTIONS.items()},
        sources=sources,
        config_file=file,
        notifier_tables=_notifier_tables(tables.get(NOTIFIERS, {}), file),
    )
    if settings.notifier_tables:
        # The file configures notifiers: check their tables now, as every other key is, whatever the command.
        installed = settings.notifiers
        for name in settings.notifier_tables:
            if name not in installed:
                settings.warnings.append(_not_installed(name, file))
    if file is not None:
        settings.warnings.extend(_exposed_secrets(file, raw, settings))
    return settings


def _check_log(log: dict[str, Any], sources: dict[str, str]) -> None:
    if log["format"] not in ("text", "json"):
        raise ConfigError(f"log.format must be text or json, got {log['format']!r}")
    if log["level"].lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log.level must be debug, info, warning or error, got {log['level']!r} (from {sources['log.level']})"
        )


def _notifier_tables(raw: Any, path: Path | None) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{NOTIFIERS} in {path} must be tables, one a notifier: [notifiers.NAME]")
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{NOTIFIERS}.{name} in {path} must be a table: [notifiers.{name}]")
    return {name: dict(table) for name, table in raw.items()}


def _not_installed(name: str, path: Path | None) -> str:
    from campaign_manager.notifiers import load_errors  # see Settings._notifier_settings

    failed = load_errors().get(name)
    why = f"the notifier {name!r} failed to load ({failed})" if failed else f"no notifier {name!r} is installed"
    return f"{path}: [notifiers.{name}] is ignored: {why} (see `cm plugins`)"


def _exposed_secrets(path: Path, raw: dict[str, Any], settings: Settings) -> list[str]:
    """A warning if the file holds a secret (a value `mask` hides) and every local user may read it. Group-readable
    is fine: a systemd unit's group may need to read the file."""
    secrets = {f"{NOTIFIERS}.{name}.{k.name}" for name, k in _notifier_keys(settings) if k.secret}
    secrets |= {name for name, k in KEYS.items() if k.secret}
    if not any(mask(name, value, secret=name in secrets) != value for name, value in _flatten(raw).items()):
        return []
    try:
        readable_by_all = bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return []
    if not readable_by_all:
        return []
    return [f"{path} holds a password and every user of this machine can read it (chmod o-r {path})"]


def _notifier_keys(settings: Settings) -> list[tuple[str, Key]]:
    """(notifier, key) for the notifiers whose table the file has (the others were not loaded)."""
    if not settings.notifier_tables:
        return []
    return [(name, k) for name, config in settings.notifiers.items() for k in declared(type(config))]


def _serve_links(values: dict[str, dict[str, Any]], sources: dict[str, str]) -> None:
    """`serve.base_url` gives the one-click link its default (`{base}/u/{token}`), and must be an http(s) URL."""
    base = values["serve"]["base_url"].strip().rstrip("/")
    if not base:
        return
    if not base.lower().startswith(("https://", "http://")) or any(c in base for c in " <>\"'{}"):
        raise ConfigError(f"serve.base_url {base!r} is not an http(s) URL", hint='e.g. "https://lists.example.com"')
    values["serve"]["base_url"] = base
    if not values["unsubscribe"]["url"]:
        values["unsubscribe"]["url"] = base + "/u/{token}"
        sources["unsubscribe.url"] = f"serve.base_url ({sources['serve.base_url']})"


def default_queue_url(database_url: str) -> str:
    """SQLite databases get a queue file beside them; a PostgreSQL database holds the queue's tables itself."""
    if database_url.startswith("sqlite:///"):
        db_path = Path(database_url.removeprefix("sqlite:///"))
        return f"sqlite:///{db_path.with_name(db_path.stem + '-queue.db')}"
    return database_url


MASKED = "********"
SECRET_WORDS = ("password", "secret", "token")


def mask(name: str, value: Any, *, secret: bool = False) -> Any:
    """Hide passwords: whole values of declared secrets (and of keys named like one), and the password part of
    URLs."""
    if value is None or value == "" or (isinstance(value, list | tuple) and not value):
        return value  # nothing to hide
    if secret or any(word in name.rsplit(".", 1)[-1] for word in SECRET_WORDS):
        return MASKED
    text = str(value)
    if "://" in text and "@" in text:
        scheme, rest = text.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":" + MASKED
        return f"{scheme}://{creds}@{host}"
    return value


def describe_settings(settings: Settings) -> dict[str, Any]:
    """What `cm config show` prints, as a table and as --json: the file read, and every key (cm's own, then each
    installed notifier's) with its value, secrets masked, and where it came from."""
    shown: dict[str, dict[str, Any]] = {}
    for name, value in settings.values().items():
        shown[name] = {"value": _plain(mask(name, value, secret=KEYS[name].secret)), "source": settings.sources[name]}
    sources = settings.notifier_sources
    for notifier, config in settings.notifiers.items():
        for k in declared(type(config)):
            name = f"{NOTIFIERS}.{notifier}.{k.name}"
            value = _plain(mask(name, getattr(config, k.attribute), secret=k.secret))
            shown[name] = {"value": value, "source": sources[name]}
    return {"config_file": str(settings.config_file) if settings.config_file else None, "settings": shown}


def _plain(value: Any) -> Any:
    """A value as JSON gives it back: a path as text, a list key's tuple as a list."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value


def render_example(*, database_url: str | None = None) -> str:
    """campaign.toml.example, made from the declarations (cm's sections, then the built-in notifiers' tables),
    so that it documents every key; a test compares the file (`python -m campaign_manager.config` rewrites it).
    With `database_url`, the starter file of `cm init --database`: that one key is set."""
    lines = [
        "# cm configuration. Every key is optional; CM_* environment variables override this file and",
        "# command-line flags override both. Relative SQLite paths are relative to this file.",
        "# `cm config show` prints the effective values and where each came from.",
    ]
    for table, cls in SECTIONS.items():
        lines += ["", f"[{table}]"]
        for k in declared(cls):
            lines += _example_key(k)
            if table == "database" and k.name == "url" and database_url is not None:
                lines.append(f"url = {toml_value(database_url)}")
    lines += [
        "",
        "# Notifiers: one table each, [notifiers.NAME] (`cm plugins` lists those installed); a table for one",
        "# that is not installed is ignored, with a warning. The built-in notifiers' keys:",
    ]
    from campaign_manager.notifiers import builtin_notifiers, config_class  # see Settings._notifier_settings

    for name, cls in sorted(builtin_notifiers().items()):
        lines += ["", f"# [{NOTIFIERS}.{name}]"]
        for k in declared(config_class(cls)):
            lines += _example_key(k)
    return "\n".join(lines) + "\n"


def _example_key(k: Key) -> list[str]:
    env = f" (env {k.env})" if k.env else ""
    secret = "; a secret: keep this file private, or set it in the environment" if k.secret else ""
    return [f"# {k.help}{secret}{env}", f"# {k.name} = {k.example_value()}"]


def write_example(path: Path) -> bool:
    """Rewrite the example file from the declarations; whether it changed."""
    text = render_example()
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


if __name__ == "__main__":  # python -m campaign_manager.config [PATH]: regenerate campaign.toml.example
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "campaign.toml.example")
    print(f"{target}: {'rewritten' if write_example(target) else 'already up to date'}")
