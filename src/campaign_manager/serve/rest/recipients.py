"""`/recipients/`: create, list (all, or the active ones), show, update, opt out and opt in, through the same
services as `cm recipient`. Consent changes go through the consent service with the source `api`; `PATCH` never
opts anyone in (only `POST /recipients/opt-in` does, as only `cm recipient opt-in` does)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Request, Response
from sqlmodel import Session

from campaign_manager.audience import listing, recipients
from campaign_manager.errors import ConsentError, InvalidInput
from campaign_manager.serve.deps import Db, Reader
from campaign_manager.serve.rest.auth import api_router
from campaign_manager.serve.rest.paging import LINK_HEADER, Page, finish, page_of
from campaign_manager.serve.rest.schemas import (
    MAX_ID,
    OptInIn,
    OptOutIn,
    RecipientIn,
    RecipientOut,
    RecipientPatch,
    errors,
)
from campaign_manager.states import RecipientStatus

SOURCE = "api"  # the consent log's source of every change made here
router = api_router(prefix="/recipients", tags=["recipients"])
RecipientId = Annotated[int, Path(ge=1, le=MAX_ID)]
Paged = Annotated[Page, Depends(page_of)]


def _one(session: Session, person: Any) -> dict[str, Any]:
    return recipients.describe_many(session, [person])[0]


@router.post("/", status_code=201, response_model=RecipientOut, responses=errors(400, 404, 409))
def create_recipient(body: RecipientIn, session: Db) -> dict[str, Any]:
    """Create a recipient (active), optionally in groups. An address that opted out answers 409 `consent` (creating
    it again would not make it active); one that exists, 409 `conflict`; a forgotten one, 409 `consent`."""
    groups = [str(g) for g in dict.fromkeys([*([body.group_id] if body.group_id else []), *body.groups])]
    person = recipients.create_recipient(
        session, body.email, name=body.name, phone=body.phone, attributes=body.attributes, groups=groups
    )
    return _one(session, person)


@router.get("/", response_model=list[RecipientOut], responses={200: {"headers": LINK_HEADER}, **errors()})
def list_recipients(request: Request, response: Response, page: Paged, session: Reader) -> list[dict[str, Any]]:
    """Every recipient, by id, a page at a time."""
    rows = listing.recipients_page(session, after=page.after, limit=page.rows)
    return finish(request, response, rows, page, lambda row: int(row["id"]))


@router.get("/active", response_model=list[RecipientOut], responses={200: {"headers": LINK_HEADER}, **errors()})
def list_active(request: Request, response: Response, page: Paged, session: Reader) -> list[dict[str, Any]]:
    """The recipients who may be mailed, by id, a page at a time: not the opted-out, bounced or pending ones
    (pending: signed up on the web and not yet confirmed)."""
    rows = listing.recipients_page(session, status=RecipientStatus.ACTIVE, after=page.after, limit=page.rows)
    return finish(request, response, rows, page, lambda row: int(row["id"]))


@router.get("/{recipient_id}", response_model=RecipientOut, responses=errors(404))
def show_recipient(recipient_id: RecipientId, session: Reader) -> dict[str, Any]:
    """One recipient."""
    return _one(session, recipients.get_recipient(session, recipient_id))


@router.patch("/{recipient_id}", response_model=RecipientOut, responses=errors(400, 404, 409))
def update_recipient(recipient_id: RecipientId, body: RecipientPatch, session: Db) -> dict[str, Any]:
    """Change a recipient's name, phone, attributes or groups (`group_id` adds one: a recipient may be in many),
    and opt them out with `opt_out: true`. `opt_out: false` changes nothing for someone active, and answers 409
    `consent` for someone opted out: reactivating a person takes their consent, through POST /recipients/opt-in."""
    person = recipients.get_recipient(session, recipient_id)
    if body.opt_out is False and person.status == RecipientStatus.OPTED_OUT:
        raise ConsentError(
            f"recipient {recipient_id} opted out; `opt_out: false` does not opt anyone back in",
            hint="POST /recipients/opt-in with their email, once they asked to come back",
        )
    if body.reason is not None and not body.opt_out:
        raise InvalidInput("`reason` goes with `opt_out: true` (why the person opted out)")
    adds = [str(g) for g in dict.fromkeys([*([body.group_id] if body.group_id else []), *body.add_groups])]
    person = recipients.update_recipient(
        session,
        recipient_id,
        name=body.name,
        phone=body.phone,
        attributes=body.attributes,
        add_groups=adds,
        remove_groups=[str(g) for g in body.remove_groups],
    )
    if body.opt_out:
        person, _ = recipients.opt_out_address(session, str(recipient_id), reason=body.reason, source=SOURCE)
    return _one(session, person)


@router.post("/opt-out", response_model=RecipientOut, responses=errors(400, 404, 409))
def opt_out(body: OptOutIn, session: Db) -> dict[str, Any]:
    """Opt an address out: it is never mailed again until it opts in. An address no recipient holds is recorded
    as an opted-out recipient (so no later import or create can mail it); a forgotten one answers 409 `consent`."""
    person, _ = recipients.opt_out_address(session, body.email, reason=body.reason, source=SOURCE)
    return _one(session, person)


@router.post("/opt-in", response_model=RecipientOut, responses=errors(400, 404, 409))
def opt_in(body: OptInIn, session: Db) -> dict[str, Any]:
    """Make an opted-out (or forgotten) address active again, as `cm recipient opt-in` does: the only way back,
    for a person who asked to come back. An address cm never held answers 404."""
    person, _ = recipients.opt_in_address(session, body.email, reason=body.reason, source=SOURCE)
    return _one(session, person)
