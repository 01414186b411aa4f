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

    settings = state(ctx).settings
    url = settings.database_url
    if settings.database_is_default:
        db.create_database(url, make_folder=True)  # the default location is made on first use, by any command
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
    """Create the database if it is new, or migrate it to this cm's schema.

    This is the one command that creates a database you named (--database, CM_DATABASE_URL, database.url): for a
    SQLite file its folder must exist; a PostgreSQL database must exist and gets cm's tables.

    Example: cm db upgrade
    """
    from campaign_manager import db

    settings = state(ctx).settings
    url = settings.database_url
    before = db.upgrade(url, make_folder=settings.database_is_default)
    if before == db.HEAD_REVISION:
        info(ctx, f"{db.display_url(url)}: already at {db.HEAD_REVISION}")
    else:
        info(ctx, f"{db.display_url(url)}: {before or 'empty'} -> {db.HEAD_REVISION}")
