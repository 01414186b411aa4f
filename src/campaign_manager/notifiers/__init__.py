"""The notifier contract and the plugin registry.

A notifier delivers one rendered message to one recipient. Plugins are found through the entry-point group
`campaign_manager.notifiers`; the built-ins are declared in cm's own pyproject under the same group, so they
load exactly like third-party ones. Loading is lazy and happens once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

ENTRY_POINT_GROUP = "campaign_manager.notifiers"


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


@runtime_checkable
class Notifier(Protocol):
    """What a plugin implements. `name` is the entry-point name it was registered under."""

    name: str

    def __init__(self, config: dict[str, Any]) -> None:
        """`config` is the plugin's table from campaign.toml (`[notifiers.NAME]`)."""

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


def load_notifiers() -> dict[str, type[Notifier]]:
    """All notifier classes by name; a plugin that fails to import is recorded, not fatal."""
    global _loaded
    with _lock:
        if _loaded is None:
            from importlib.metadata import entry_points

            found: dict[str, type[Notifier]] = {}
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                _sources[ep.name] = ep.value
                try:
                    found[ep.name] = ep.load()
                except Exception as exc:
                    _errors[ep.name] = f"{type(exc).__name__}: {exc}"
            _loaded = found
        return dict(_loaded)


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


def describe_plugins() -> list[dict[str, Any]]:
    loaded = load_notifiers()
    rows = [{"name": n, "module": _sources.get(n, ""), "status": "loaded"} for n in sorted(loaded)]
    rows += [{"name": n, "module": _sources.get(n, ""), "status": f"failed: {e}"} for n, e in sorted(_errors.items())]
    return rows
