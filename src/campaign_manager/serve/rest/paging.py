"""Keyset paging of every list: `?limit=` (default 100, at most 1,000) and `?after=` (the last key of the page
before), the body a bare JSON array, and the next page's address in a `Link: <...>; rel="next"` header when there
is one. A page reads `limit + 1` rows from its key on (never OFFSET, never a count), so its cost is the same on
the first page as on the last of a million rows, and the extra row tells whether a next page exists."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar
from urllib.parse import urlencode

from fastapi import Query, Request, Response

from campaign_manager.serve.deps import settings_of
from campaign_manager.serve.rest.schemas import MAX_ID

DEFAULT_LIMIT = 100
MAX_LIMIT = 1_000
T = TypeVar("T")

LINK_HEADER = {
    "Link": {
        "description": 'The next page, when there is one: `<URL>; rel="next"`',
        "schema": {"type": "string"},
    }
}


@dataclass(frozen=True)
class Page:
    limit: int
    after: int

    @property
    def rows(self) -> int:
        """How many rows to read: one more than the page, to know whether another follows."""
        return self.limit + 1


def page_of(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="At most this many (1 to 1,000)")] = DEFAULT_LIMIT,
    after: Annotated[
        int, Query(ge=0, le=MAX_ID, description="Only those after this key: the last one of the page before")
    ] = 0,
) -> Page:
    return Page(limit=limit, after=after)


def finish(request: Request, response: Response, rows: Sequence[T], page: Page, key: Callable[[T], int]) -> list[T]:
    """The page to answer with (`rows` read with `page.rows`), and its Link header when another page follows."""
    shown = list(rows[: page.limit])
    if len(rows) > page.limit:
        response.headers["Link"] = f'<{next_url(request, key(shown[-1]), page.limit)}>; rel="next"'
    return shown


def next_url(request: Request, last: int, limit: int) -> str:
    """This request's address with `after` moved on; on `serve.base_url` when it is set (behind a proxy, this
    process does not know the scheme and host people use)."""
    query = urlencode({**request.query_params, "limit": str(limit), "after": str(last)})
    public = settings_of(request).serve.base_url.rstrip("/")
    return f"{public}{request.url.path}?{query}" if public else str(request.url.replace(query=query))
