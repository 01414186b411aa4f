"""`/groups/`: create, list, show, rename, add addresses to, and list the members of a group, through the same
services as `cm group`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Response
from sqlmodel import Session

from campaign_manager.audience import groups, listing, members
from campaign_manager.serve.deps import Db, Reader
from campaign_manager.serve.rest.auth import api_router
from campaign_manager.serve.rest.paging import LINK_HEADER, Page, finish, page_of
from campaign_manager.serve.rest.schemas import (
    MAX_ID,
    GroupIn,
    GroupOut,
    GroupPatch,
    GroupRecipientsIn,
    MemberResult,
    RecipientOut,
    errors,
)
from campaign_manager.states import RecipientStatus

router = api_router(prefix="/groups", tags=["groups"])
GroupId = Annotated[int, Path(ge=1, le=MAX_ID)]
Paged = Annotated[Page, Depends(page_of)]


def _one(session: Session, group: Any) -> dict[str, Any]:
    return groups.describe_groups(session, [group])[0]


@router.post("/", status_code=201, response_model=GroupOut, responses=errors(400, 409))
def create_group(body: GroupIn, session: Db) -> dict[str, Any]:
    """Create a group. Names are unique ignoring case (409 `conflict`) and may not be all digits (400)."""
    return _one(session, groups.create_group(session, body.name, description=body.description))


@router.get("/", response_model=list[GroupOut], responses={200: {"headers": LINK_HEADER}, **errors()})
def list_groups(request: Request, response: Response, page: Paged, session: Reader) -> list[dict[str, Any]]:
    """Every group, by id, a page at a time, with its member and active-member counts."""
    rows = groups.groups_page(session, after=page.after, limit=page.rows)
    return finish(request, response, rows, page, lambda row: int(row["id"]))


@router.get("/{group_id}", response_model=GroupOut, responses=errors(404))
def show_group(group_id: GroupId, session: Reader) -> dict[str, Any]:
    """One group, with its member and active-member counts."""
    return _one(session, groups.get_group(session, group_id))


@router.patch("/{group_id}", response_model=GroupOut, responses=errors(400, 404, 409))
def update_group(group_id: GroupId, body: GroupPatch, session: Db) -> dict[str, Any]:
    """Rename a group, change its description (an empty description clears it), or offer it on the sign-up form."""
    group = groups.update_group(session, group_id, name=body.name, description=body.description, public=body.public)
    return _one(session, group)


@router.patch("/{group_id}/recipients", response_model=list[MemberResult], responses=errors(400, 404, 409))
def add_recipients(group_id: GroupId, body: GroupRecipientsIn, session: Db) -> list[dict[str, Any]]:
    """Add addresses to a group, creating the recipients that do not exist (at most 1,000 a request: they are
    applied here and now; more: POST /imports). The answer says what became of each address, in order: `created`,
    `added`, `already_member`, `duplicate`, `invalid` (with the reason; the valid ones are applied all the same) or
    `suppressed` (opted out or forgotten: never added, never reactivated)."""
    return members.add_recipients(session, group_id, body.recipient_emails)


@router.get(
    "/{group_id}/recipients",
    response_model=list[RecipientOut],
    responses={200: {"headers": LINK_HEADER}, **errors(404)},
)
def group_recipients(
    request: Request,
    response: Response,
    group_id: GroupId,
    page: Paged,
    session: Reader,
    active: Annotated[bool, Query(description="Only the members who may be mailed")] = False,
) -> list[dict[str, Any]]:
    """A group's members, by id, a page at a time."""
    gid = int(groups.get_group(session, group_id).id or 0)
    status = RecipientStatus.ACTIVE if active else None
    rows = listing.recipients_page(session, status=status, group_id=gid, after=page.after, limit=page.rows)
    return finish(request, response, rows, page, lambda row: int(row["id"]))
