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

    Example: cm config show --json
    """
    from campaign_manager.config import mask

    settings = state(ctx).settings
    rows = [
        {"key": key, "value": mask(key, value), "source": settings.sources[key]}
        for key, value in settings.values.items()
    ]
    data: Any = rows
    if as_json:
        data = {
            "config_file": str(settings.config_file) if settings.config_file else None,
            "settings": {r["key"]: {"value": r["value"], "source": r["source"]} for r in rows},
        }
    else:
        info(ctx, f"config file: {settings.config_file or 'none'}")
    emit(data, as_json=as_json, render=lambda r: print_table(r, ("key", "value", "source")))


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
