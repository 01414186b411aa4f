"""The rows an import stages, as types: each good row of the file (`StagedRow`), each rejected one (`Reject`), and
a batch of both (`Batch`). The staging tables are generated from the rows' fields (`create_table`), so the rows the
parser makes and the tables the appliers fill cannot drift apart."""

from __future__ import annotations

import types
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints


class StagedRow(NamedTuple):
    """A good row of the file, ready to stage (its address valid, every value within its limit)."""

    line: int  # the line where the record starts
    key: str  # the address's key (audience.addresses.email_keys)
    email: str | None  # the address as it is stored, or None when that is its key (most addresses are lowercase)
    name: str | None
    gone: int  # 1 when the address was forgotten (consent.sql_may_add's `gone`), else 0
    normalized: int  # 1: `email` is normalized; 0: a plain address, whose domain SQL lowercases
    attributes: str  # the text of a JSON object


class Reject(NamedTuple):
    """A row the import refuses, and why."""

    line: int
    raw: str  # the record as written (its first RAW_KEPT characters)
    reason: str


class Batch(NamedTuple):
    """What the parser makes of a batch of records."""

    rows: list[StagedRow]
    rejects: list[Reject]
    read: int  # records read, valid or not
    position: int  # bytes of the file consumed so far


_SQL_TYPES = {int: "INTEGER", str: "TEXT"}  # the same names on SQLite and PostgreSQL


def columns(row: type[tuple[Any, ...]]) -> str:
    """The row type's fields as a SQL column list, in order."""
    return ", ".join(row._fields)  # type: ignore[attr-defined]


def create_table(name: str, row: type[tuple[Any, ...]], *, first: str = "", constraint: str = "") -> str:
    """`CREATE TEMP TABLE name (...)` with a column for each field of the NamedTuple `row`: INTEGER or TEXT, NOT
    NULL unless the field may be None. `first`, a column definition, goes before them, `constraint` after."""
    hints = get_type_hints(row)
    defined = [first] if first else []
    for field in row._fields:  # type: ignore[attr-defined]
        hint = hints[field]
        union = get_origin(hint) in (Union, types.UnionType)
        kinds = [t for t in get_args(hint) if t is not type(None)] if union else [hint]
        if len(kinds) != 1 or kinds[0] not in _SQL_TYPES:
            raise TypeError(f"{row.__name__}.{field}: no SQL type for {hint!r}")
        nullable = union and type(None) in get_args(hint)
        defined.append(f"{field} {_SQL_TYPES[kinds[0]]}{'' if nullable else ' NOT NULL'}")
    return f"CREATE TEMP TABLE {name} ({', '.join([*defined, *filter(None, [constraint])])})"
