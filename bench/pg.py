"""A throwaway PostgreSQL database for one benchmark, always dropped afterwards."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from bench.proc import redact


class Unavailable(Exception):
    """PostgreSQL cannot be used; the message says why."""


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """Create a fresh database on the server of server_url, yield its URL, then drop it (even on error or ^C)."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        raise Unavailable(f"psycopg is not installed ({exc})") from None
    name = f"cm_bench_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = psycopg.connect(server_url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise Unavailable(f"cannot connect to {redact(server_url)}: {str(exc).strip().splitlines()[0]}") from None
    with admin:
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise Unavailable(f"cannot create a database: {str(exc).strip().splitlines()[0]}") from None
        try:
            yield with_database(server_url, name)
        finally:
            # FORCE (PostgreSQL 13+) ends sessions a crashed or killed worker may have left open.
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))
