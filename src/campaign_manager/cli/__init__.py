"""The `cm` command: global options, the sub-apps (one per noun) and the one error boundary.

Only typer and the standard library are imported here: SQLModel, Huey and Rich load inside the commands that
need them, so `cm --help` starts fast.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, NoSuchOption, UsageError

from campaign_manager import __version__
from campaign_manager.cli._common import State, end_quietly_on_broken_pipe, report_error, report_unexpected
from campaign_manager.cli._help import Command, Group, build, name_values
from campaign_manager.errors import CmError, ExitCode, InvalidInput

# noun -> short help. Each noun's module is imported (and its Typer app turned into a click group) only when that
# noun is used: building every command up front costs ~40 ms, a third of the start-up budget.
NOUNS: dict[str, str] = {
    "recipient": "Create, list, update, opt out and forget recipients.",
    "group": "Create groups and manage their members.",
    "campaign": "Create and inspect campaigns.",
    "db": "Inspect and migrate the database schema.",
    "config": "Show the effective configuration.",
    "plugins": "List notifier plugins.",
    "jobs": "List, inspect, cancel, retry and purge background jobs.",
    "worker": "Run queued jobs (imports, sends), for good or until the queue is empty.",
    "serve": "Serve the unsubscribe and sign-up pages, and the REST API.",
}

_built: dict[str, Any] = {}


def _refuse(exc: ClickException) -> typer.Exit:
    """A usage error (a missing argument, an unknown option or command, a bad value) as one `error:` line and
    exit 2, like any invalid input; Click would print its usage block and `Error: ...` over four lines."""
    message = exc.format_message()
    if isinstance(exc, NoSuchOption) and exc.possibilities:
        message = f"{exc.message}; did you mean {' or '.join(sorted(exc.possibilities))}?"
    message = message.strip().removesuffix(".").replace(". Did you mean", "; did you mean")
    if message[1:2].islower():  # "Missing argument" -> "missing argument", as cm's own messages read
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    hint = f"see `{ctx.command_path} --help`" if isinstance(exc, UsageError) and ctx is not None else None
    error = InvalidInput(message, hint=hint) if isinstance(exc, UsageError) else CmError(message)
    report_error(error)
    return typer.Exit(error.exit_code if isinstance(exc, UsageError) else exc.exit_code)


class _Boundary(Group):
    """The root group: loads nouns lazily, and turns CmError, usage errors (and anything unexpected) into one
    line on stderr and an exit code, never a traceback. Both the console script and CliRunner come through here
    (`main` calls `make_context`, then `invoke`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name_values(self, None)

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *NOUNS]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in NOUNS:
            return super().get_command(ctx, cmd_name)
        # Built once per process: a program that runs many commands (the test suite) pays ~20 ms a noun only once.
        if cmd_name not in _built:
            from importlib import import_module

            _built[cmd_name] = build(cmd_name, import_module(f"campaign_manager.cli.{cmd_name}").app)
        return _built[cmd_name]

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(name, NOUNS[name]) for name in NOUNS]
        rows += [(name, cmd.get_short_help_str(60)) for name, cmd in self.commands.items() if not cmd.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        # Parsing `cm`'s own options (`cm --bogus`) fails here, before `invoke`.
        try:
            return super().make_context(info_name, args, parent, **extra)
        except NoArgsIsHelpError:
            raise  # `cm` alone: its help, on stderr, exit 2
        except ClickException as exc:
            raise _refuse(exc) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CmError as exc:
            report_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except NoArgsIsHelpError:
            raise  # a noun alone (`cm group`): its help, on stderr, exit 2
        except ClickException as exc:
            raise _refuse(exc) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            raise end_quietly_on_broken_pipe() from None
        except Exception as exc:
            if type(exc).__module__.startswith(("click", "typer")):
                raise
            report_unexpected(exc, verbose=bool(ctx.obj and ctx.obj.verbose))
            raise typer.Exit(ExitCode.INTERNAL) from None


app = typer.Typer(
    name="cm",
    cls=_Boundary,
    help="An email campaign manager that lives in a terminal.\n\nExample: cm group create newsletter",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    add_completion=False,
)


@app.command("init", cls=Command)
def init(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing campaign.toml")] = False,
    database: Annotated[
        str | None,
        typer.Option("--database", help="Create this database (SQLite path or postgresql:// URL) and name it"),
    ] = None,
) -> None:
    """Write a starter campaign.toml in the current folder (readable by you only).

    With --database (here or before `init`), that database is created and migrated first, and the file names it.

    Example: cm init --database /var/lib/cm/cm.db
    """
    from campaign_manager.cli._common import state
    from campaign_manager.cli.config import write_starter

    write_starter(ctx, force=force, database=database if database is not None else state(ctx).database)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cm {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    config_path: Annotated[
        str | None, typer.Option("--config", help="Config file (default: $CM_CONFIG, ./campaign.toml, ...)")
    ] = None,
    database: Annotated[
        str | None, typer.Option("--database", help="Database URL or SQLite path; overrides the config")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more (to stderr)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    ctx.obj = State(config_path=config_path, database=database, verbose=verbose, quiet=quiet)
    ctx.obj.setup_logging()


def main() -> None:
    app()
