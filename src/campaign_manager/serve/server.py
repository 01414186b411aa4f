"""Running the application: `cm serve` binds its socket here (a port in use is a one-line error, exit 1), then
uvicorn serves it until SIGTERM or SIGINT, which stop it gracefully (requests in flight finish; exit 0, as a
service stops). uvicorn's access log is off: nothing is logged about visitors."""

from __future__ import annotations

import logging
import signal
import socket
from typing import TYPE_CHECKING

from campaign_manager import db
from campaign_manager.errors import CmError, ConfigError

if TYPE_CHECKING:
    from campaign_manager.config import Settings

log = logging.getLogger("campaign_manager.serve")
GRACE_SECONDS = 10


def bind(host: str, port: int) -> socket.socket:
    """The listening socket. Made with proto IPPROTO_TCP, as asyncio would make it: asyncio sets TCP_NODELAY only on
    connections whose socket says so, and without it every answer after the first on a kept-alive connection waited
    ~40 ms (Nagle's algorithm against the client's delayed ACK: 22 requests a second on one connection, not 400)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise CmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_server(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    try:
        import uvicorn

        from campaign_manager.serve.app import create_app
    except ImportError as exc:
        raise ConfigError(
            f"cm serve needs the serve extra ({exc.name} is not installed)",
            hint="pip install 'campaign-manager[serve]'",
        ) from None
    db.ensure_schema(settings.database_url, create=settings.database_is_default)
    app = create_app(settings)
    host = host or settings.serve.host
    sock = bind(host, settings.serve.port if port is None else port)
    config = uvicorn.Config(
        app,
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # the client's address is worked out by serve.clients, from serve.trusted_proxies
        lifespan="on",  # the application's start sizes its thread pool (serve.threads)
        timeout_graceful_shutdown=GRACE_SECONDS,
    )
    server = uvicorn.Server(config)
    bound_host, bound_port = sock.getsockname()[:2]
    where = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("cm serve listening on http://%s:%d (API %s)", where, bound_port, _api_state(settings))
    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it found: a quiet one, so that a
    # stop is a clean exit rather than a KeyboardInterrupt or a death by signal.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    log.info("cm serve stopped")


def _api_state(settings: Settings) -> str:
    return "on" if settings.serve.api_token else "off: serve.api_token is not set"
