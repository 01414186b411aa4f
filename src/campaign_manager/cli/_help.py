"""cm's one help style, applied to every command as the nouns are built: Click's plain layout (no Rich panels, and
no Rich to import), each value named for what it is (`PATH`, `EMAIL`, `ID|NAME`, `N`), examples kept on one line.

A value's name comes from the parameter's name (NAMES, SUFFIXES), else from its type (TYPES), so an option added
later gets a sane one without a line of its own; give `metavar=` only where neither says it.
"""

from __future__ import annotations

import inspect
from datetime import datetime
from difflib import get_close_matches
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer._click import Context, HelpFormatter  # Typer 0.29 ships its own Click; these are its types
from typer._click.exceptions import UsageError
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandInfo, DefaultPlaceholder

from campaign_manager.cli._params import plain

NAMES: dict[str, str] = {
    "attr": "KEY=VALUE",
    "config_path": "PATH",
    "csv": "PATH",
    "database": "URL",
    "delimiter": "CHAR",
    "email": "EMAIL",
    "email_column": "HEADER",
    "encoding": "ENCODING",
    "from_": "EMAIL",
    "grace": "SECONDS",
    "group": "ID|NAME",
    "id": "ID",
    "name": "NAME",
    "phone": "PHONE",
    "recipient": "ID|EMAIL",
    "status": "STATUS",
    "url": "URL",
}
SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_group", "ID|NAME"),
    ("_recipient", "ID|EMAIL"),
    ("_id", "ID"),
    ("_email", "EMAIL"),
    ("_csv", "PATH"),
    ("_file", "PATH"),
    ("_path", "PATH"),
    ("_dir", "PATH"),
    ("_url", "URL"),
    ("_at", "DATETIME"),
    ("_seconds", "SECONDS"),
)
TYPES: dict[type, str] = {int: "N", float: "NUMBER", Path: "PATH", datetime: "DATETIME", str: "TEXT"}
# `ref`, the record a command acts on, by what its noun's service looks it up by; any other noun: by id.
REFS: dict[str, str] = {"recipient": "ID|EMAIL", "group": "ID|NAME"}


def metavar(param: TyperArgument | TyperOption, noun: str | None) -> str:
    """The name help gives the value `param` takes (`cm recipient update ID|EMAIL --attr KEY=VALUE`)."""
    name = param.name or ""
    if name == "ref":
        return REFS.get(noun or "", "ID")
    if name in NAMES:
        return NAMES[name]
    for suffix, label in SUFFIXES:
        if name.endswith(suffix):
            return label
    annotation: Any = param.type_descriptor.annotation
    if get_origin(annotation) is list:  # a repeatable option names one value
        (annotation,) = get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "|".join(str(member.value) for member in annotation)
    return TYPES.get(annotation, "VALUE") if isinstance(annotation, type) else "VALUE"


def name_values(command: Any, noun: str | None) -> None:
    """Give every value-taking parameter of `command` (and of its subcommands) a metavar; flags get none. Each
    parameter also gets its value without pydantic where its type allows (`_params.plain`)."""
    for param in command.params:
        if isinstance(param, TyperOption) and (param.is_flag or param.count):
            param.metavar = None
        elif isinstance(param, TyperArgument | TyperOption) and param.metavar is None:
            param.metavar = metavar(param, noun)
        if isinstance(param, TyperArgument | TyperOption):
            plain(param)
    for sub in getattr(command, "commands", {}).values():
        name_values(sub, noun)


def build(noun: str, app: typer.Typer) -> Any:
    """The click command of a noun's Typer app, in this style: its commands and group use the classes below. A
    noun of several commands is a `Noun`, whose commands are made as they are asked for."""
    app.rich_markup_mode = None
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = Command
    if len(app.registered_commands) == 1 and not app.registered_callback:  # `cm plugins`: one command, no group
        command = typer.main.get_command(app)
        # Typer builds it as a program of its own, with shell-completion options; those belong to `cm`.
        command.params = [p for p in command.params if p.name not in ("install_completion", "show_completion")]
    else:
        if isinstance(app.info.cls, DefaultPlaceholder) or app.info.cls is None:
            app.info.cls = Noun
        infos, app.registered_commands = app.registered_commands, []
        try:
            command = typer.main.get_group(app)  # the group alone: its options, help and callback
        finally:
            app.registered_commands = infos
        assert isinstance(command, Noun)
        command.pending = {_command_name(info): info for info in infos}
        command.pretty_exceptions_short = app.pretty_exceptions_short
    command.name = noun
    name_values(command, noun)
    return command


def _command_name(info: CommandInfo) -> str:
    """The name Typer gives a command: its own, else its function's (`list_` -> `list`)."""
    return info.name or typer.main.get_command_name(getattr(info.callback, "__name__", ""))


def _usage(command: TyperCommand | TyperGroup, ctx: Context) -> list[str]:
    # Click's convention, where Typer writes `{name}`: a required argument bare, an optional one in brackets.
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if isinstance(param, TyperArgument):
            piece = param.metavar or (param.name or "").upper()
            piece += "..." if param.nargs != 1 else ""
            pieces.append(piece if param.required else f"[{piece}]")
        else:
            pieces.extend(param.get_usage_pieces(ctx))
    return pieces


def _help_text(command: TyperCommand | TyperGroup, formatter: HelpFormatter) -> None:
    text = inspect.cleandoc(command.help or "").partition("\f")[0]
    if not text:
        return
    # Click rewraps every paragraph to the terminal; an example is kept as written (`\b`), so it copies as one line.
    paragraphs = [f"\b\n{p}" if p.startswith("Example:") else p for p in text.split("\n\n")]
    formatter.write_paragraph()
    with formatter.indentation():
        formatter.write_text("\n\n".join(paragraphs))


def _parameters(command: TyperCommand | TyperGroup, ctx: Context, formatter: HelpFormatter) -> None:
    arguments, options = [], []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        if isinstance(param, TyperArgument):
            # Typer would write `name <str>`: the metavar alone says it.
            arguments.append((param.metavar or (param.name or "").upper(), record[1]))
        else:
            options.append(record)
    for title, rows in (("Arguments", arguments), ("Options", options)):
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)


class Command(TyperCommand):
    """A command with cm's plain help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        return _usage(self, ctx)

    def format_help_text(self, ctx: Context, formatter: HelpFormatter) -> None:
        _help_text(self, formatter)

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _parameters(self, ctx, formatter)

    def get_help_option(self, ctx: Context) -> TyperOption | None:
        return _plain_help(super().get_help_option(ctx))


class Group(TyperGroup):
    """A group (a noun, or `cm` itself) with cm's plain help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        return [*_usage(self, ctx), self.subcommand_metavar]

    def format_help_text(self, ctx: Context, formatter: HelpFormatter) -> None:
        _help_text(self, formatter)

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _parameters(self, ctx, formatter)
        self.format_commands(ctx, formatter)

    def get_help_option(self, ctx: Context) -> TyperOption | None:
        return _plain_help(super().get_help_option(ctx))

    def resolve_command(self, ctx: Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            # Typer suggests only among the commands already made; the nouns and their commands are made as they are
            # used (cm's root, `Noun`), so suggest among all.
            matches = get_close_matches(args[0], self.list_commands(ctx)) if args else []
            if matches and "Did you mean" not in exc.message:
                exc.message = f"{exc.message.rstrip('.')}. Did you mean {' or '.join(map(repr, matches))}?"
            raise


def _plain_help(option: TyperOption | None) -> TyperOption | None:
    # Click makes `--help` apart from the command's own parameters (and keeps it): its value needs no pydantic either.
    if option is not None:
        plain(option)
    return option


class Noun(Group):
    """A noun (`cm group`) whose commands are made, their signatures read and their options built, only when one is
    asked for: `cm group list` makes `list` alone (`cm group --help` makes them all)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, CommandInfo] = {}  # name -> what Typer makes the command from, in Typer's order
        self.pretty_exceptions_short = True

    def list_commands(self, ctx: Context) -> list[str]:
        return [*self.pending, *(name for name in self.commands if name not in self.pending)]

    def get_command(self, ctx: Context, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in self.pending:
            command = typer.main.get_command_from_info(
                self.pending[cmd_name], pretty_exceptions_short=self.pretty_exceptions_short, rich_markup_mode=None
            )
            name_values(command, self.name)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)
