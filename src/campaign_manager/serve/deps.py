"""What every route asks for: the settings, a database session (one transaction, committed when the route returns
normally), the client's IP address."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Depends, Request
from sqlmodel import Session

from campaign_manager.db import is_sqlite, open_session
from campaign_manager.serve.clients import client_ip

if TYPE_CHECKING:
    from campaign_manager.config import Settings
    from campaign_manager.serve.views import Views


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def views_of(request: Request) -> Views:
    return request.app.state.views  # type: ignore[no-any-return]


# Sessions are opened and ended on threads of their own, apart from the pool the routes run on, and a session has
# its connection before its route starts. When a route thread checked the connection out and the default pool also
# ended sessions, a burst deadlocked on PostgreSQL: every route thread waited for a connection of the engine's pool,
# and every connection was held by a request whose route had returned and whose answer (FastAPI validates it on a
# route thread) and commit waited for one (50 clients, 8 threads, 30 connections: not one answer). Now a route
# thread never waits for a connection, and ending a session never waits for anything but the database.
_OPENINGS, _ENDINGS = CapacityLimiter(64), CapacityLimiter(64)


def _dependency(*, write: bool) -> Callable[[Request], AsyncIterator[Session]]:
    async def dependency(request: Request) -> AsyncIterator[Session]:
        url = settings_of(request).database_url
        writers: anyio.Semaphore | None = request.app.state.sqlite_writers if write and is_sqlite(url) else None
        if writers is None:
            async with _opened(url, write=write) as opened:
                yield opened
            return
        # SQLite has one writer at a time: this process's writers take turns here, first come first served, rather
        # than in SQLite's busy handler, whose growing sleeps favour the latest comer (50 one-click POSTs at once:
        # p99 4.7 s behind p50 0.2 s).
        async with writers, _opened(url, write=write) as opened:
            yield opened

    return dependency


@asynccontextmanager
async def _opened(url: str, *, write: bool) -> AsyncIterator[Session]:
    """A session over `url` whose connection is checked out (and its transaction begun) and which is ended, on
    threads of their own (see _OPENINGS)."""
    opening = open_session(url, write=write)

    def enter() -> Session:
        opened = opening.__enter__()
        try:
            opened.connection()  # the connection, and the transaction (SQLite: BEGIN IMMEDIATE to write), now
        except BaseException as exc:
            opening.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return opened

    opened = await anyio.to_thread.run_sync(enter, limiter=_OPENINGS)
    try:
        yield opened
    except BaseException as exc:
        ending = functools.partial(opening.__exit__, type(exc), exc, exc.__traceback__)
        if not await anyio.to_thread.run_sync(ending, limiter=_ENDINGS):
            raise
    else:
        await anyio.to_thread.run_sync(opening.__exit__, None, None, None, limiter=_ENDINGS)


session = _dependency(write=True)
# A session that only reads: on SQLite it takes no write lock, so a listing never waits behind an import.
reading = _dependency(write=False)


# What a route takes to use the database (`Reader` when it only reads). `scope="function"`: the session commits
# when the route returns, before the answer is sent (FastAPI's default runs a dependency's exit after the response):
# a 200 means the change is stored, and a failed commit reaches the error handler (503) instead of following a 200.
Db = Annotated[Session, Depends(session, scope="function")]
Reader = Annotated[Session, Depends(reading, scope="function")]


def client_of(request: Request) -> str | None:
    peer = request.client.host if request.client is not None else None
    return client_ip(peer, request.headers.get("x-forwarded-for"), request.app.state.trusted)
