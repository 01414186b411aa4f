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


def write_starter(ctx: typer.Context, *, force: bool) -> None:
    """`cm init` (defined in cli/__init__ so that it needs no import of this module to be listed)."""
    from campaign_manager.config import CONFIG_FILENAME, render_example
    from campaign_manager.errors import Conflict

    target = Path(CONFIG_FILENAME)
    if target.exists() and not force:
        raise Conflict(f"{target} already exists", hint="use --force to overwrite")
    target.write_text(render_example(), encoding="utf-8")
    info(ctx, f"wrote {target.resolve()}")
