"""The one-click unsubscribe (RFC 8058) and its pages: `POST /u/{token}`, `GET /u/{token}`, `POST /undo/{token}`.

- `POST /u/{token}` opts the person out at once and answers 200: what a mail provider calls with
  `List-Unsubscribe=One-Click`, and what the page's button sends (with `via=web`, so the consent event's source
  says `web` rather than `one-click`). No cookie, CSRF token or redirect: the token is the whole authority.
- `GET /u/{token}` only shows a page with that button: mail scanners and link previews fetch every URL in a
  message, so a GET never changes anything.
- `POST /undo/{token}` re-subscribes, with the undo token the confirmation page carries (only when that POST made
  the change; it works for an hour, while that opt-out is the person's latest consent event).

The rules are in `sending.unsubscribe`; this module reads the request and picks the page. Every answer says
no-store, no-referrer and noindex: the URL holds a token. Nothing is logged about visitors here; what is stored is
the consent event (its source and the client's IP address).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from campaign_manager.sending import unsubscribe
from campaign_manager.sending.tokens import BadToken
from campaign_manager.serve.deps import Db, client_of, settings_of, views_of
from campaign_manager.serve.views import mask_address
from campaign_manager.states import RecipientStatus
from campaign_manager.tables.audience import Recipient

router = APIRouter(include_in_schema=False)

FORM_BYTES = 4096  # the button's form is a few bytes; a mail provider's body a few dozen: read no more
ONE_CLICK, WEB = "one-click", "web"


async def _source(request: Request) -> str:
    """`web` when the page's own form sent the POST (`via=web`), `one-click` otherwise (a mail provider, whose body
    is `List-Unsubscribe=One-Click`, urlencoded or multipart). The body decides nothing else: reading it is bounded,
    and one that cannot be read is a one-click all the same."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return ONE_CLICK
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_BYTES:
            return ONE_CLICK
    try:
        fields = parse_qsl(body.decode("latin-1"), max_num_fields=10)
    except ValueError:  # more fields than a form of ours has
        return ONE_CLICK
    return WEB if ("via", WEB) in fields else ONE_CLICK


def _page(request: Request, name: str, *, status: int = 200, **values: Any) -> HTMLResponse:
    return HTMLResponse(views_of(request).render(name, **values), status_code=status)


def _masked(recipient: Recipient | None) -> str | None:
    return None if recipient is None else mask_address(recipient.email)


def _bad_token(request: Request, *, undo: bool = False) -> HTMLResponse:
    """400, and still a way to unsubscribe: the mailto: address when there is one, else a reply to any message."""
    mailto = settings_of(request).unsubscribe.mailto or None
    return _page(request, "bad_token.html", status=400, mailto=mailto, undo=undo)


@router.get("/u/{token:path}", response_class=HTMLResponse)
def unsubscribe_page(request: Request, token: str, db: Db) -> HTMLResponse:
    try:
        found = unsubscribe.visit(db, settings_of(request), token)
    except BadToken:
        return _bad_token(request)
    out = found.recipient is not None and found.recipient.status == RecipientStatus.OPTED_OUT
    return _page(
        request,
        "unsubscribe.html",
        address=_masked(found.recipient),
        already_out=out and not found.test,
        test=found.test,
    )


@router.post("/u/{token:path}", response_class=HTMLResponse)
def unsubscribe_now(request: Request, token: str, db: Db, source: Annotated[str, Depends(_source)]) -> HTMLResponse:
    try:
        done = unsubscribe.unsubscribe(db, settings_of(request), token, source=source, client_ip=client_of(request))
    except BadToken:
        return _bad_token(request)
    # The undo form's URL is relative to this page's, so that it works below any path prefix a proxy adds.
    undo_url = None if done.undo_token is None else f"../undo/{done.undo_token}"
    return _page(request, "unsubscribed.html", address=_masked(done.recipient), undo_url=undo_url, test=done.test)


@router.get("/undo/{token:path}", response_class=HTMLResponse)
def undo_page(request: Request, token: str, db: Db) -> HTMLResponse:
    """The undo link opened again (the address bar after the button, a reload): the confirmation with its Undo button
    once more, while the undo still applies. A GET changes nothing."""
    try:
        recipient = unsubscribe.undoable(db, settings_of(request), token)
    except BadToken:
        return _bad_token(request, undo=True)
    undo_url = None if recipient is None else token.rsplit("/", 1)[-1]  # relative: this same address
    return _page(request, "unsubscribed.html", address=_masked(recipient), undo_url=undo_url, test=False)


@router.post("/undo/{token:path}", response_class=HTMLResponse)
def undo(request: Request, token: str, db: Db) -> HTMLResponse:
    try:
        recipient = unsubscribe.undo(db, settings_of(request), token, client_ip=client_of(request))
    except BadToken:
        return _bad_token(request, undo=True)
    return _page(request, "resubscribed.html", address=_masked(recipient))
