"""What every route asks for: the settings, a database session (one transaction, committed when the route returns
normally), the client's IP address."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import Request
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


def client_of(request: Request) -> str | None:
    peer = request.client.host if request.client is not None else None
    return client_ip(peer, request.headers.get("x-forwarded-for"), request.app.state.trusted)
