"""What every command shares: the lazily loaded settings and session, output to stdout/stderr, the error line."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from campaign_manager.errors import CmError, ExitCode, InvalidInput

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.config import Settings

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table")]


@dataclass
class State:
    config_path: str | None = None
    database: str | None = None
    verbose: bool = False
    quiet: bool = False
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from campaign_manager.config import load_settings

            self._settings = load_settings(self.config_path, {"database.url": self.database})
            self.setup_logging(self._settings.log.level, self._settings.log.format)
            if self._settings.warnings:
                import logging  # not at the top: `cm --help` does without it

                for warning in self._settings.warnings:
                    logging.getLogger("campaign_manager.config").warning(warning)
        return self._settings

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        from campaign_manager.db import settings_session

        with settings_session(self.settings, write=write) as session:
            yield session

    def setup_logging(self, level_name: str | None = None, log_format: str | None = None) -> None:
        """Before the settings load, from the environment; again once they have (the file may say more)."""
        from campaign_manager.logs import setup_logging

        setup_logging(level_name, log_format, verbose=self.verbose, quiet=self.quiet)


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


def _json_default(value: Any) -> Any:
    # Called for every date of every row of a long listing: no import in here.
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"cannot serialize {type(value).__name__}")


def print_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=_json_default, ensure_ascii=False) + "\n")


# What a terminal would act on instead of showing: C0 controls, DEL, C1 controls (ESC and CSI start escape
# sequences; CR and LF rewrite or split lines), and the bidirectional overrides and isolates, which reorder what
# follows them ("Trojan Source").
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """`text` safe to print for a person: control and bidi-override characters shown as `\\x1b`, `\\n`,
    `\\u202e`, .... Only for people: --json, CSV and files keep the exact text. A backslash is left as it is."""
    if text.isprintable():  # the common case, and the cheap test
        return text
    return _UNSAFE.sub(_escape_char, text)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, list | tuple):
        return escape_controls(", ".join(str(v) for v in value))
    if isinstance(value, dict):
        return escape_controls(", ".join(f"{k}={v}" for k, v in value.items()))
    return escape_controls(str(value))


# Rows a table sizes and prints at once: Rich cannot size columns over a million rows (nor hold them), so a long
# table comes in blocks, each sized on its own rows.
TABLE_BLOCK_ROWS = 1_000


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def print_table(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    *,
    title: str | None = None,
    block_rows: int = TABLE_BLOCK_ROWS,
) -> int:
    """A table on stdout, printed a block of rows at a time as `rows` yields them, each block sized on its own
    rows; the title and header come once, at the top. On a terminal it is a Rich table; otherwise plain columns,
    one line a row, never wrapped (Rich takes ~1 ms a row: a million rows into a pipe would take a quarter of an
    hour). Returns how many rows it printed."""
    headers = [column.replace("_", " ") for column in columns]
    draw = _rich_block if stdout_is_terminal() else _plain_block
    printed = 0
    for block in _blocks(rows, block_rows):
        draw(block, columns, headers, title=title if printed == 0 else None, header=printed == 0)
        printed += len(block)
    if printed == 0:
        draw([], columns, headers, title=title, header=True)
    sys.stdout.flush()
    return printed


def _blocks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    block: list[dict[str, Any]] = []
    for row in rows:
        block.append(row)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


def _rich_block(
    block: list[dict[str, Any]], columns: Sequence[str], headers: list[str], *, title: str | None, header: bool
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold", show_header=header)
    for name in headers:
        table.add_column(name)
    for row in block:
        # Escaped: a name like "[bold]" is data, not Rich markup.
        table.add_row(*(escape(_cell(row.get(column))) for column in columns))
    Console(soft_wrap=True).print(table)


def _plain_block(
    block: list[dict[str, Any]], columns: Sequence[str], headers: list[str], *, title: str | None, header: bool
) -> None:
    cells = [[_cell(row.get(column)) for column in columns] for row in block]
    # Every block is at least as wide as the header, so that short blocks still line up under it.
    widths = [max([len(name), *(len(line[i]) for line in cells)]) for i, name in enumerate(headers)]
    out = sys.stdout
    if title:
        out.write(title + "\n")
    for line in ([headers] if header else []) + cells:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n")


def print_json_items(items: Iterable[Any]) -> int:
    """A JSON array on stdout, written element by element as `items` yields them, one element a line (as
    sqlite-utils prints rows): memory stays flat however long the list is, and the C encoder is used (an indented
    dump runs in pure Python, three times slower). Nothing is written before the first element has been read,
    so an error there leaves stdout empty. Returns how many elements it wrote."""
    import json

    encode = json.JSONEncoder(default=_json_default, ensure_ascii=False).encode
    iterator = iter(items)
    written = 0
    first = next(iterator, _END)
    out = sys.stdout
    if first is _END:
        out.write("[]\n")
        return 0
    out.write("[" + encode(first))
    written = 1
    for item in iterator:
        out.write(",\n " + encode(item))
        written += 1
    out.write("]\n")
    out.flush()
    return written


_END = object()


def end_quietly_on_broken_pipe() -> typer.Exit:
    """A reader that stopped early (`cm recipient list | head`): the output ends quietly, as Python's documentation
    advises. stdout is pointed at /dev/null so that the flush at exit cannot fail again; the exit code is 1."""
    import os

    with suppress(OSError, ValueError):  # ValueError: a stdout with no file behind it (tests)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return typer.Exit(ExitCode.ERROR)


def print_record(record: dict[str, Any], *, fields: Sequence[str] | None = None) -> None:
    """One object as `key: value` lines."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(soft_wrap=True, highlight=False)
    for key in fields or list(record):
        label = escape(escape_controls(key.replace("_", " ")))
        console.print(f"[bold]{label}[/bold]: {escape(_cell(record.get(key)))}")


def emit(data: Any, *, as_json: bool, render: Any) -> None:
    """--json prints `data` (a list as every listing prints one, an element a line); otherwise `render(data)`
    draws it for a person."""
    if as_json and isinstance(data, list):
        print_json_items(data)
    elif as_json:
        print_json(data)
    else:
        render(data)


def emit_items(items: Iterable[dict[str, Any]], *, as_json: bool, columns: Sequence[str]) -> int:
    """A listing, streamed: --json prints a JSON array as the items arrive, otherwise a table in blocks."""
    return print_json_items(items) if as_json else print_table(items, columns)


def info(ctx: typer.Context, message: str) -> None:
    """A message for a person: stderr, silenced by --quiet."""
    if not state(ctx).quiet:
        typer.echo(escape_controls(message), err=True)


def report_error(exc: CmError) -> None:
    """The one line a failure gets on stderr (escaped: a message may quote what the user or a file gave)."""
    line = f"error: {exc.message}"
    if exc.hint:
        line += f" ({exc.hint})"
    typer.echo(escape_controls(line), err=True)


def report_unexpected(exc: BaseException, *, verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    typer.echo(escape_controls(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)"), err=True)


def parse_attrs(values: Sequence[str] | None) -> dict[str, str]:
    """--attr KEY=VALUE, repeated."""
    attrs: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"malformed --attr {item!r}: expected KEY=VALUE")
        attrs[key.strip()] = value
    return attrs
