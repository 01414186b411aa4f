"""`cm config show` and `cm init`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from campaign_manager.cli._common import JsonOption, emit, info, print_table, state

app = typer.Typer(name="config", no_args_is_help=True)


@app.callback()
def config() -> None:
    """Show the effective configuration.

    Example: cm config show
    """
    # A callback keeps `config` a group: Typer would otherwise fold its one command into `cm config` itself.


@app.command("show")
def show(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Print the effective settings and where each came from (secrets masked).

    The keys of every installed notifier's table ([notifiers.NAME]) come after cm's own.

    Example: cm config show --json
    """
    from campaign_manager.config import describe_settings

    model = describe_settings(state(ctx).settings)
    if not as_json:
        info(ctx, f"config file: {model['config_file'] or 'none'}")
    emit(model, as_json=as_json, render=_render)


def _render(model: dict[str, Any]) -> None:
    rows = [{"key": key, **shown} for key, shown in model["settings"].items()]
    print_table(rows, ("key", "value", "source"))


def write_starter(ctx: typer.Context, *, force: bool, database: str | None) -> None:
    """`cm init` (defined in cli/__init__ so that it needs no import of this module to be listed). With a
    database, that database is created (and migrated) first, so that a file naming it is written only once it
    exists."""
    from campaign_manager.config import CONFIG_FILENAME, render_example, resolve_url
    from campaign_manager.errors import Conflict, InvalidInput
    from campaign_manager.files import open_private_text

    target = Path(CONFIG_FILENAME)
    if target.exists() and not force:
        raise Conflict(f"{target} already exists", hint="use --force to overwrite")
    if database is not None:
        from campaign_manager import db

        if not database.strip():
            raise InvalidInput("--database is empty", hint="give a SQLite path or a URL")
        # As the file will read it: a relative path is relative to the file, which is in this folder.
        url = resolve_url(database, Path.cwd())
        db.upgrade(url)
        info(ctx, f"{db.display_url(url)}: ready, at revision {db.HEAD_REVISION}")
    # 0600: the file may hold a database password.
    with open_private_text(target) as out:
        out.write(render_example(database_url=database))
    info(ctx, f"wrote {target.resolve()}")
