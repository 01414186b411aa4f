"""`cm plugins`: the notifier plugins found through the `campaign_manager.notifiers` entry points."""

from __future__ import annotations

import typer

from campaign_manager.cli._common import JsonOption, emit, print_table

app = typer.Typer(name="plugins")

COLUMNS = ("name", "package", "version", "needs", "status", "error")


@app.command()
def plugins(as_json: JsonOption = False) -> None:
    """List the notifier plugins: each one's package and version, the address it sends to, and whether it loaded
    (a plugin that failed to is listed with the error, and skipped by every other command). --json also gives
    each one's entry point (`module`).

    Example: cm plugins --json
    """
    from campaign_manager.notifiers import describe_plugins

    emit(describe_plugins(), as_json=as_json, render=lambda rows: print_table(rows, COLUMNS))
