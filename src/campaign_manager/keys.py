"""Settings declared as typed classes: one class is one table of campaign.toml, each of its fields one key.

    class OutboxSettings(NamedTuple):
        folder: Annotated[Path, key("where the .eml files go", env="CM_NOTIFIERS_OUTBOX_FOLDER")] = Path("outbox")

The field gives the key's name, type and default; `key()` adds its one-line help, the environment variable that
can supply it and whether it is a secret (masked by `cm config show`). The class is a NamedTuple or a frozen
dataclass: immutable, typed. cm's own sections (`sections`) and every notifier's table (`[notifiers.NAME]`) are
declared this way and read by the same code: values come from the defaults, then the file, then the environment,
and are checked against the declared type, so a caller reads `settings.worker.retries` as an int with no cast.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from keyword import iskeyword
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, ForwardRef, NamedTuple, get_args, get_origin, get_type_hints

from campaign_manager.errors import ConfigError

# The types a key may have (optionally `| None`, for a key whose default is "not set"); `tuple` is a list of
# strings (`tuple[str, ...]`): a TOML array in the file, commas or spaces between items in the environment.
KINDS: tuple[type, ...] = (str, int, float, bool, Path, tuple)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class KeyDoc(NamedTuple):
    """What `key()` says about a key, beside its type and default."""

    help: str
    env: str | None = None
    secret: bool = False
    example: str | None = None


def key(help: str, *, env: str | None = None, secret: bool = False, example: str | None = None) -> KeyDoc:
    """The annotation that declares a field a key: `retries: Annotated[int, key("times ...", env="CM_...")] = 3`.
    `help`: one line; `env`: the environment variable that can set it; `secret`: masked by `cm config show`;
    `example`: the value campaign.toml.example shows (TOML, maybe with a comment) when the default is not one to
    show (None, worked out at run time)."""
    return KeyDoc(help, env, secret, example)


class Key(NamedTuple):
    """One declared key. (Named tuples here and for cm's own sections, not dataclasses: every `cm` command loads
    them, and defining a dataclass costs about ten times as much.)"""

    name: str
    kind: type  # one of KINDS
    optional: bool  # `kind | None`: None means not set
    default: Any
    help: str
    env: str | None = None
    secret: bool = False
    example: str | None = None

    @property
    def attribute(self) -> str:
        """The field of the settings class holding it (`from_` for the key `from`)."""
        return f"{self.name}_" if iskeyword(self.name) else self.name

    @property
    def type_name(self) -> str:
        names = {Path: "a path", bool: "true or false", int: "an integer", float: "a number", tuple: "a list"}
        return names.get(self.kind, "a string")

    def example_value(self) -> str:
        """The value line of campaign.toml.example (after `name = `)."""
        if self.example is not None:
            return self.example
        return toml_value(self.default)


_declared: dict[type, tuple[Key, ...]] = {}


def declared(cls: type) -> tuple[Key, ...]:
    """The keys a settings class declares, in order. Raises TypeError for a class that is not one (a plugin's
    mistake, caught by its first test)."""
    if cls not in _declared:
        _declared[cls] = _declare(cls)
    return _declared[cls]


def _defaults(cls: type) -> dict[str, Any]:
    """Each field's default (a key must have one), for a NamedTuple or a frozen dataclass."""
    if dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
        given: dict[str, Any] = getattr(cls, "_field_defaults", {})
        defaults = {name: given.get(name, dataclasses.MISSING) for name in getattr(cls, "_fields", ())}
    else:
        raise TypeError(f"{cls.__qualname__} must be a NamedTuple or a frozen dataclass")
    for name, default in defaults.items():
        if default is dataclasses.MISSING:
            raise TypeError(f"{cls.__qualname__}.{name} needs a default (None for a key not set)")
    return defaults


def _declare(cls: type) -> tuple[Key, ...]:
    defaults = _defaults(cls)
    hints = dict(getattr(cls, "__annotations__", {}))
    # A NamedTuple's annotations are all its own; evaluated only if they are strings (`from __future__ import
    # annotations`; NamedTuple makes them ForwardRefs), which costs time at every start.
    if dataclasses.is_dataclass(cls) or any(isinstance(hint, str | ForwardRef) for hint in hints.values()):
        hints = get_type_hints(cls, include_extras=True)
    keys = []
    for name, default in defaults.items():
        hint, where = hints.get(name), f"{cls.__qualname__}.{name}"
        docs = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, KeyDoc)]
        if get_origin(hint) is not Annotated or len(docs) != 1:
            raise TypeError(f"{where} must be annotated Annotated[TYPE, key(...)] (campaign_manager.keys.key)")
        kind, optional = _kind(get_args(hint)[0], where)
        # A key named by a Python keyword is declared with a trailing underscore (`from_` is the key `from`).
        keys.append(Key(name[:-1] if iskeyword(name[:-1]) else name, kind, optional, default, *docs[0]))
    return tuple(keys)


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of the settings class `cls` from its values by key name (in declaration order)."""
    return cls(*(values[k.name] for k in declared(cls)))


def _kind(hint: Any, where: str) -> tuple[type, bool]:
    args = get_args(hint) if isinstance(hint, UnionType) else ()
    if args and NoneType in args and len(args) == 2:
        (inner,) = (a for a in args if a is not NoneType)
        return _kind(inner, where)[0], True
    if get_origin(hint) is tuple and get_args(hint) == (str, ...):
        return tuple, False
    if hint not in KINDS or hint is tuple:
        raise TypeError(f"{where}: a key's type must be one of {', '.join(k.__name__ for k in KINDS)} (or | None)")
    return hint, False


def coerce(k: Key, value: Any, *, name: str, source: str, base: Path | None = None) -> Any:
    """`value` as the key's type, or ConfigError naming the key (`name`, dotted) and where it came from. A string
    is parsed (the environment gives nothing else); an integer is a fine float, but a float is no integer and a
    boolean neither. A relative path is made absolute against `base` (the file's folder, or the working folder for
    the environment); None keeps it relative."""
    kind, text = k.kind, isinstance(value, str)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if text and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
        elif kind is int and isinstance(value, str | int) and not isinstance(value, bool):
            return int(value)
        elif kind is float and isinstance(value, str | int | float) and not isinstance(value, bool):
            return float(value)
        elif kind is str and text:
            return value
        elif kind is tuple and text:
            return tuple(item for item in value.replace(",", " ").split() if item)
        elif kind is tuple and isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return tuple(value)
        elif kind is Path and text and value.strip():
            path = Path(value).expanduser()
            return (base / path).resolve() if base is not None and not path.is_absolute() else path
    except ValueError:
        pass
    raise ConfigError(f"{name} from {source} must be {k.type_name}, got {value!r}")


def read_table(
    cls: type,
    prefix: str,
    table: Mapping[str, Any],
    *,
    file: Path | None,
    sources: dict[str, str],
) -> dict[str, Any]:
    """The values of one table: declared defaults, then `table` (from `file`), then the environment. `prefix` is
    the table's dotted name (`notifiers.outbox`); `sources` gets where each value came from. An undeclared key in
    `table` is a ConfigError."""
    keys = {k.name: k for k in declared(cls)}
    values = {}
    for name in table:
        if name not in keys:
            known = ", ".join(keys) or "none"
            raise ConfigError(f"unknown key {f'{prefix}.{name}'!r} in {file}", hint=f"the keys of [{prefix}]: {known}")
    for k in keys.values():
        dotted = f"{prefix}.{k.name}"
        values[k.name], sources[dotted] = k.default, "default"
        if k.name in table:
            source = f"file {file}"
            base = file.parent if file is not None else None
            values[k.name] = coerce(k, table[k.name], name=dotted, source=source, base=base)
            sources[dotted] = source
        if k.env and os.environ.get(k.env):
            values[k.name] = coerce(k, os.environ[k.env], name=dotted, source=k.env, base=Path.cwd())
            sources[dotted] = f"env {k.env}"
    return values


def toml_value(value: Any) -> str:
    """`value` as TOML (for the example file): a string is a basic string (JSON's escapes are TOML's, except
    that TOML also wants DEL escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return repr(value)
