"""The notifier contract and the plugin registry.

A notifier delivers one rendered message to one recipient. Plugins are found through the entry-point group
`campaign_manager.notifiers`; the built-ins are declared in cm's own pyproject under the same group, so they
load exactly like third-party ones. Loading is lazy and happens once per process.

A notifier's settings are its table in campaign.toml, `[notifiers.NAME]`. It declares the keys it takes in a typed
class, its `config_class` (a NamedTuple or a frozen dataclass), one field a key, annotated with `key()` (its help,
its environment variable, whether it is a secret; see `campaign_manager.keys`): cm refuses an unknown key or a
value of the wrong type (exit 7), masks the secrets in `cm config show`, and hands the notifier an instance.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from campaign_manager.keys import key as key  # for plugins: `from campaign_manager.notifiers import key`

ENTRY_POINT_GROUP = "campaign_manager.notifiers"
DISTRIBUTION = "campaign-manager"  # whose entry points are the built-ins


@dataclass(frozen=True)
class Message:
    """One message for one recipient, already rendered."""

    to: str
    subject: str
    text: str
    html: str | None = None
    sender: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Stable across retries, so a notifier (or the receiving side) can drop a duplicate.
    idempotency_key: str = ""


class NoKeys(NamedTuple):
    """The settings of a notifier that declares none: any key in its table is refused."""


@runtime_checkable
class Notifier(Protocol):
    """What a plugin implements. `name` is the entry-point name it was registered under."""

    name: str
    # The keys of its table, [notifiers.NAME] (see the module's doc). A notifier without one takes no keys.
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        """`config`: an instance of `config_class`, from its defaults, the plugin's table in campaign.toml and
        the environment variables it declares, each value checked against its declared type."""

    def send(self, message: Message) -> str:
        """Deliver one message; return a provider id (Message-ID, say). Raise to report a failure: a
        `TemporaryFailure` is retried, anything else marks the delivery failed."""
        ...


class TemporaryFailure(Exception):
    """The delivery may succeed later (a 4xx SMTP reply, a timeout, a 503)."""


_lock = threading.Lock()
_loaded: dict[str, type[Notifier]] | None = None
_errors: dict[str, str] = {}
_sources: dict[str, str] = {}
_builtin: set[str] = set()


def load_notifiers() -> dict[str, type[Notifier]]:
    """All notifier classes by name; a plugin that fails to import is recorded, not fatal."""
    global _loaded
    with _lock:
        if _loaded is None:
            from importlib.metadata import entry_points

            found: dict[str, type[Notifier]] = {}
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                _sources[ep.name] = ep.value
                if ep.dist is not None and ep.dist.name == DISTRIBUTION:
                    _builtin.add(ep.name)
                try:
                    found[ep.name] = ep.load()
                except Exception as exc:
                    _errors[ep.name] = f"{type(exc).__name__}: {exc}"
            _loaded = found
        return dict(_loaded)


def builtin_notifiers() -> dict[str, type[Notifier]]:
    """The notifiers cm itself ships (its own entry points): the ones campaign.toml.example documents."""
    return {name: cls for name, cls in load_notifiers().items() if name in _builtin}


def load_errors() -> dict[str, str]:
    """name -> why the plugin failed to load."""
    load_notifiers()
    return dict(_errors)


def config_class(cls: type[Notifier]) -> type:
    """The class declaring `cls`'s keys."""
    declared: type = getattr(cls, "config_class", NoKeys)
    return declared


def register(name: str, cls: type[Notifier], *, source: str = "registered in process") -> None:
    """Add a notifier without an entry point (tests, embedding programs)."""
    load_notifiers()
    assert _loaded is not None
    _loaded[name], _sources[name] = cls, source


def unregister(name: str) -> None:
    if _loaded is not None:
        _loaded.pop(name, None)
    _sources.pop(name, None)
    _errors.pop(name, None)
    _builtin.discard(name)


def describe_plugins() -> list[dict[str, Any]]:
    loaded = load_notifiers()
    rows = [{"name": n, "module": _sources.get(n, ""), "status": "loaded"} for n in sorted(loaded)]
    rows += [{"name": n, "module": _sources.get(n, ""), "status": f"failed: {e}"} for n, e in sorted(_errors.items())]
    return rows
