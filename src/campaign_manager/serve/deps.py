"""What every route asks for: the settings, a database session (one transaction, committed when the route returns
normally), the client's IP address."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from campaign_manager.db import open_session
from campaign_manager.serve.clients import client_ip

if TYPE_CHECKING:
    from campaign_manager.config import Settings
    from campaign_manager.serve.views import Views


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def views_of(request: Request) -> Views:
    return request.app.state.views  # type: ignore[no-any-return]


def session(request: Request) -> Iterator[Session]:
    with open_session(settings_of(request).database_url) as opened:
        yield opened


def reading(request: Request) -> Iterator[Session]:
    """A session that only reads: on SQLite it takes no write lock, so a listing never waits behind an import."""
    with open_session(settings_of(request).database_url, write=False) as opened:
        yield opened


# What a route takes to use the database (`Reader` when it only reads). `scope="function"`: the session commits
# when the route returns, before the answer is sent (FastAPI's default runs a dependency's exit after the response):
# a 200 means the change is stored, and a failed commit reaches the error handler (503) instead of following a 200.
Db = Annotated[Session, Depends(session, scope="function")]
Reader = Annotated[Session, Depends(reading, scope="function")]


def client_of(request: Request) -> str | None:
    peer = request.client.host if request.client is not None else None
    return client_ip(peer, request.headers.get("x-forwarded-for"), request.app.state.trusted)
