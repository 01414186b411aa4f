"""`cm db ...`: the schema version."""

from __future__ import annotations

import typer

from campaign_manager.cli._common import JsonOption, emit, info, print_record, state

app = typer.Typer(
    name="db", help="Inspect and migrate the database schema.\n\nExample: cm db status", no_args_is_help=True
)


@app.command("status")
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the database, its schema revision and the revision this cm needs.

    Example: cm db status
    """
    from campaign_manager import db

    url = state(ctx).settings.database_url
    current = db.current_revision(url)
    data = {
        "database": db.display_url(url),
        "revision": current,
        "head": db.HEAD_REVISION,
        "up_to_date": current == db.HEAD_REVISION,
    }
    emit(data, as_json=as_json, render=print_record)


@app.command("upgrade")
def upgrade(ctx: typer.Context) -> None:
    """Migrate the database to this cm's schema (creating it if new).

    Example: cm db upgrade
    """
    from campaign_manager import db

    url = state(ctx).settings.database_url
    before = db.current_revision(url)
    db.upgrade(url)
    info(ctx, f"{db.display_url(url)}: {before or 'empty'} -> {db.HEAD_REVISION}")
