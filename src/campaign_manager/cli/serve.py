"""`cm serve`: the public pages (one-click unsubscribe, double opt-in) and the REST API, over HTTP."""

from __future__ import annotations

from typing import Annotated

import typer

from campaign_manager.cli._common import state

app = typer.Typer(name="serve")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default: serve.host)")] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help="Port to listen on (default: serve.port)")
    ] = None,
) -> None:
    """Serve the unsubscribe and sign-up pages, and the REST API when serve.api_token is set.

    Run it behind a proxy that terminates TLS (Caddy, nginx) and set serve.base_url to its https address: messages
    then carry one-click unsubscribe links to it.

    SIGTERM or SIGINT stops it after the requests in flight (exit 0). Needs the serve extra.

    Example: cm serve --port 8000

    Example: CM_API_TOKEN=$(openssl rand -hex 32) cm serve --host 0.0.0.0
    """
    from campaign_manager.serve.server import run_server

    run_server(state(ctx).settings, host=host, port=port)
