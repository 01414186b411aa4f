"""`cm plugins`: the notifier plugins found through the `campaign_manager.notifiers` entry points."""

from __future__ import annotations

import typer

from campaign_manager.cli._common import JsonOption, emit, print_table

app = typer.Typer(name="plugins")


@app.command()
def plugins(as_json: JsonOption = False) -> None:
    """List the notifier plugins that loaded, and the ones that failed to.

    Example: cm plugins --json
    """
    from campaign_manager.notifiers import describe_plugins

    emit(describe_plugins(), as_json=as_json, render=lambda r: print_table(r, ("name", "module", "status")))
