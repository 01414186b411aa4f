"""The notifier contract and the plugin registry.

A notifier delivers rendered messages. The sender opens it once for a run of work, hands it messages in batches
and closes it after, so that connections are reused:

    class Notifier:
        name = "sms"                      # the entry-point name it is registered under
        config_class = SmsSettings        # its [notifiers.sms] keys (see below); optional
        needs = Need.PHONE                # the address it sends to: Need.EMAIL (the default) or Need.PHONE

        def __init__(self, config: SmsSettings) -> None: ...
        def open(self) -> None: ...                       # optional; may be a coroutine
        def send_batch(self, messages: Sequence[Message]) -> list[Result]: ...   # one Result a message, in order
        def close(self) -> None: ...                      # optional; may be a coroutine

`send_batch` may be a coroutine (`async def`: the built-in email notifier) or a plain function, which the sender
runs in a thread (the outbox, and most third-party plugins). Each message gets a `Result`: `Result.sent(provider
id)`, `Result.retry(reason)` (transient: tried again later, with backoff, up to `send.max_attempts`) or
`Result.failed(reason)` (permanent). A failure of the notifier itself rather than of one message (the server or
gateway is down, authentication was refused) is `raise NotifierDown(reason)` from `open` or `send_batch`: the
sender counts no attempt against the messages it did not get results for, backs off and tries again later.

A notifier that can report results one by one as they complete defines `stream(messages)` instead (an async
generator of `(message, result)` pairs, fed from an async iterator of messages); the sender then records results
as they come. The email notifier does, so that a crash can lose at most the results of the messages in flight.

Plugins are found through the entry-point group `campaign_manager.notifiers`; the built-ins are declared in cm's own
pyproject under the same group, so they load exactly like third-party ones. Loading is lazy and happens once per
process; a plugin that fails to import, or that breaks the contract (no `send_batch` nor `stream`, an unknown
`needs`, a `config_class` whose fields are not keys), is reported (`cm plugins`) and skipped.

A notifier's settings are its table in campaign.toml, `[notifiers.NAME]`. It declares the keys it takes in a typed
class, its `config_class` (a NamedTuple or a frozen dataclass), one field a key, annotated with `key()` (its help,
its environment variable, whether it is a secret; see `campaign_manager.keys`): cm refuses an unknown key or a
value of the wrong type (exit 7), masks the secrets in `cm config show`, and hands the notifier an instance. A key
named `rate` (messages per second, 0 for no limit) is the notifier's rate limit, applied by the sender.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from campaign_manager.keys import declared
from campaign_manager.keys import key as key  # for plugins: `from campaign_manager.notifiers import key`

ENTRY_POINT_GROUP = "campaign_manager.notifiers"
DISTRIBUTION = "campaign-manager"  # whose entry points are the built-ins


class Need(StrEnum):
    """The address a notifier sends to. A recipient without one is skipped (reason `no email` / `no phone`)."""

    EMAIL = "email"
    PHONE = "phone"


class Message(NamedTuple):
    """One message for one recipient, rendered.

    `data` is the whole RFC 5322 message (headers and body, CRLF line endings, not dot-stuffed), ready for SMTP or
    an .eml file; `subject`, `text` and `html` are the same content for notifiers that post it elsewhere (an SMS or
    chat gateway). `key` is the idempotency key, `<database id>-<delivery id>`: the same for every attempt at one
    delivery, so a notifier (or the receiving side) can drop a duplicate."""

    key: str
    to: str  # the address the notifier needs: an email address, or a phone number
    sender: str  # the From header's value ("News <news@example.com>")
    envelope_from: str  # the bare address (SMTP's MAIL FROM)
    subject: str
    text: str
    html: str | None = None
    data: bytes = b""
    message_id: str = ""  # the Message-ID header's value, "<...@domain>"
    headers: tuple[tuple[str, str], ...] = ()  # the extra headers in `data` (List-Unsubscribe ...), for gateways


class Outcome(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"
    SKIPPED = "skipped"  # the sender's own verdict (the recipient has no phone number); a notifier never returns it


class Result(NamedTuple):
    """What became of one message. Build one with `Result.sent`, `Result.retry` or `Result.failed`."""

    outcome: Outcome
    provider_id: str = ""  # the provider's id for a sent message (the SMTP reply's queue id, a gateway's id)
    reason: str = ""  # why it was not sent (one line; the sender replaces addresses in it by `<recipient>`)
    bounce: bool = False  # a permanent failure saying the address does not exist (SMTP 5.1.x): a hard bounce
    retry_after: float | None = None  # seconds the provider asked to wait (429 Retry-After), for a retry
    # The message may have been delivered although no success was heard (the connection dropped after the data
    # went out): retried, and counted as a possible duplicate.
    uncertain: bool = False

    # NamedTuples, not frozen dataclasses: one of each is made per message, and a frozen dataclass's __init__ (a
    # setattr per field) cost ~5 us a message of a send's ~300.

    @classmethod
    def sent(cls, provider_id: str = "") -> Result:
        return cls(Outcome.SENT, provider_id=provider_id)

    @classmethod
    def retry(cls, reason: str, *, after: float | None = None, uncertain: bool = False) -> Result:
        return cls(Outcome.RETRY, reason=reason, retry_after=after, uncertain=uncertain)

    @classmethod
    def failed(cls, reason: str, *, bounce: bool = False) -> Result:
        return cls(Outcome.FAILED, reason=reason, bounce=bounce)

    @classmethod
    def skipped(cls, reason: str) -> Result:
        return cls(Outcome.SKIPPED, reason=reason)


class NotifierDown(Exception):
    """The notifier itself cannot deliver (cannot connect, TLS or authentication refused, 421, a gateway that
    answers nothing): not the recipients' fault. No attempt is counted for the messages without a result; the
    sender backs off (`retry_after` seconds if given) and, after `send.max_outage`, pauses the campaign with this
    reason."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class NoKeys(NamedTuple):
    """The settings of a notifier that declares none: any key in its table is refused."""


@runtime_checkable
class Notifier(Protocol):
    """What a plugin implements (see the module's doc). `open` and `close` are optional."""

    name: str
    # The keys of its table, [notifiers.NAME] (see the module's doc). A notifier without one takes no keys.
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        """`config`: an instance of `config_class`, from its defaults, the plugin's table in campaign.toml and
        the environment variables it declares, each value checked against its declared type."""

    def send_batch(self, messages: Sequence[Message]) -> Sequence[Result] | Awaitable[Sequence[Result]]:
        """One `Result` per message, in order; `raise NotifierDown` when the notifier itself cannot deliver."""
        ...


class StreamingNotifier(Protocol):
    """A notifier that reports results as they complete (the email notifier)."""

    def stream(self, messages: AsyncIterator[Message]) -> AsyncIterator[tuple[Message, Result]]: ...


def needs(cls: type) -> Need:
    """The address `cls` sends to (`needs`, default email)."""
    return Need(getattr(cls, "needs", Need.EMAIL))


_lock = threading.Lock()
_loaded: dict[str, type[Notifier]] | None = None
_errors: dict[str, str] = {}
_sources: dict[str, str] = {}
_packages: dict[str, tuple[str, str]] = {}  # name -> (distribution, version)
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
                if ep.dist is not None:
                    _packages[ep.name] = (ep.dist.name, ep.dist.version)
                    if ep.dist.name == DISTRIBUTION:
                        _builtin.add(ep.name)
                try:
                    found[ep.name] = _check(ep.load())
                except Exception as exc:  # whatever a plugin's import raises, `cm` goes on without it
                    _errors[ep.name] = f"{type(exc).__name__}: {exc}"
            _loaded = found
        return dict(_loaded)


def _check(obj: Any) -> type[Notifier]:
    """`obj` if cm can use it as a notifier, else TypeError saying why: a plugin that loads but breaks the contract
    is reported as failed by `cm plugins` at once, rather than breaking the commands that read its table."""
    if not isinstance(obj, type):
        raise TypeError(f"{obj!r} is not a class")
    if not callable(getattr(obj, "send_batch", None)) and not callable(getattr(obj, "stream", None)):
        raise TypeError(f"{obj.__qualname__} has neither send_batch nor stream")
    declared_needs = getattr(obj, "needs", Need.EMAIL)
    if declared_needs not in tuple(Need):
        raise TypeError(f"{obj.__qualname__}.needs must be one of {', '.join(Need)}, not {declared_needs!r}")
    declared(config_class(obj))  # a TypeError naming the field that is not a key
    checked: type[Notifier] = obj
    return checked


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
    _packages.pop(name, None)
    _builtin.discard(name)


def describe_plugins() -> list[dict[str, Any]]:
    """Each notifier (loaded, then failed), with its module, package and version, and what it sends to."""
    loaded = load_notifiers()
    rows: list[dict[str, Any]] = []
    for name in sorted(loaded):
        package, version = _packages.get(name, ("", ""))
        rows.append(
            {
                "name": name,
                "module": _sources.get(name, ""),
                "package": package,
                "version": version,
                "needs": str(needs(loaded[name])),
                "status": "loaded",
                "error": None,
            }
        )
    for name, error in sorted(_errors.items()):
        package, version = _packages.get(name, ("", ""))
        rows.append(
            {
                "name": name,
                "module": _sources.get(name, ""),
                "package": package,
                "version": version,
                "needs": None,
                "status": "failed",
                "error": error,
            }
        )
    return rows
