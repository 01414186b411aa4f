"""Groups and their members. Adding people goes through the same consent rules as imports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from campaign_manager import limits
from campaign_manager.errors import Conflict, InvalidInput, NotFound
from campaign_manager.models import OPTED_OUT, Group, GroupMember, Recipient, utcnow
from campaign_manager.services import consent
from campaign_manager.services.emails import check_email, email_key

if TYPE_CHECKING:
    from campaign_manager.services.recipients import Selection

# What happened to each address given to `add_recipients`.
CREATED, ADDED, ALREADY_MEMBER, INVALID, SUPPRESSED, DUPLICATE = (
    "created",
    "added",
    "already_member",
    "invalid",
    "suppressed",
    "duplicate",
)


def name_key(name: str) -> str:
    """How a group name is matched: ignoring case, as emails are."""
    return name.strip().lower()


def find_group(session: Session, ref: str | int) -> Group | None:
    text = str(ref).strip()
    group = session.exec(select(Group).where(Group.name_key == name_key(text))).first()
    if group is None and text.isdigit():
        group = session.get(Group, int(text))
    return group


def get_group(session: Session, ref: str | int) -> Group:
    group = find_group(session, ref)
    if group is None:
        raise NotFound(f"no group {str(ref)!r}", hint="see `cm group list`")
    return group


def _check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidInput("a group name cannot be empty")
    if name.isdigit():
        raise InvalidInput(f"group name {name!r} is all digits, which would read as an id")
    limits.check("the group name", name, limits.GROUP_NAME)
    return name


def _check_description(description: str | None) -> str | None:
    return limits.check("the description", description, limits.DESCRIPTION)


def create_group(session: Session, name: str, *, description: str | None = None) -> Group:
    name = _check_name(name)
    existing = find_group(session, name)
    if existing is not None:
        raise Conflict(f"a group named {existing.name!r} already exists", hint="names are matched ignoring case")
    group = Group(name=name, name_key=name_key(name), description=_check_description(description))
    session.add(group)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"a group named {name!r} already exists") from None
    return group


def update_group(session: Session, ref: str | int, *, name: str | None = None, description: str | None = None) -> Group:
    group = get_group(session, ref)
    if name is not None and name.strip() != group.name:
        name = _check_name(name)
        existing = find_group(session, name)
        if existing is not None and existing.id != group.id:
            raise Conflict(f"a group named {existing.name!r} already exists", hint="names are matched ignoring case")
        group.name, group.name_key = name, name_key(name)
    if description is not None:
        group.description = _check_description(description) or None
    group.updated_at = utcnow()
    session.flush()
    return group


def delete_group(session: Session, ref: str | int) -> dict[str, Any]:
    """Delete the group and its memberships; the recipients stay."""
    group = get_group(session, ref)
    summary = describe_groups(session, [group])[0]
    session.delete(group)
    session.flush()
    return summary


def list_groups(session: Session) -> list[Group]:
    return list(session.exec(select(Group).order_by(col(Group.name))).all())


def describe_groups(session: Session, groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Groups with member and active-member counts: one group's counted alone, several in one pass over all
    the memberships (no query names the groups' ids, so their number is no limit)."""
    if not groups:
        return []
    counts = _member_counts(session, groups[0].id if len(groups) == 1 else None)
    return [
        {
            "id": g.id,
            "name": g.name,
            "description": g.description,
            "members": counts.get(g.id or 0, (0, 0))[0],
            "active_members": counts.get(g.id or 0, (0, 0))[1],
            "created_at": g.created_at,
        }
        for g in groups
    ]


def _member_counts(session: Session, group_id: int | None) -> dict[int, tuple[int, int]]:
    """group id -> (members, active members), for one group or (None) for all of them."""
    query = (
        select(GroupMember.group_id, func.count(), func.count().filter(consent.mailable()))
        .join(Recipient, col(Recipient.id) == GroupMember.recipient_id)
        .group_by(col(GroupMember.group_id))
    )
    if group_id is not None:
        query = query.where(GroupMember.group_id == group_id)
    return {gid: (total, active) for gid, total, active in session.exec(query).all() if gid is not None}


def add_recipients(session: Session, ref: str | int, emails: Sequence[str]) -> list[dict[str, Any]]:
    """Add addresses to a group, creating recipients that do not exist. Reports, for each input, one of
    created / added / already_member / invalid / suppressed / duplicate (given twice), with a reason."""
    group = get_group(session, ref)
    seen: set[str] = set()
    results: list[dict[str, Any]] = []
    for raw in emails:
        normalized, reason = check_email(raw)
        result: dict[str, Any] = {"input": raw, "email": normalized or None, "outcome": "", "reason": reason}
        results.append(result)
        if reason is not None:
            result["outcome"] = INVALID
            continue
        key = email_key(normalized)
        if key in seen:
            result["outcome"] = DUPLICATE
            continue
        seen.add(key)
        # One lookup an address (they are a handful), not a set of every erased address (there may be millions).
        if consent.is_forgotten(session, key):
            result.update(outcome=SUPPRESSED, reason="forgotten on request")
            continue
        recipient = session.exec(select(Recipient).where(Recipient.email_key == key)).first()
        if recipient is None:
            recipient = Recipient(email=normalized, email_key=key)
            session.add(recipient)
            session.flush()
            result["outcome"] = CREATED
        elif recipient.status == OPTED_OUT:
            result.update(outcome=SUPPRESSED, reason="opted out")
            continue
        elif session.get(GroupMember, (group.id, recipient.id)) is not None:
            result["outcome"] = ALREADY_MEMBER
            continue
        else:
            result["outcome"] = ADDED
        session.add(GroupMember(group_id=group.id, recipient_id=recipient.id))
        session.flush()
    return results


def remove_recipients(session: Session, ref: str | int, emails: Sequence[str]) -> list[dict[str, Any]]:
    """Take addresses out of a group (the recipients stay). Outcome: removed / not_member / unknown."""
    from campaign_manager.services.recipients import find_recipient

    group = get_group(session, ref)
    results: list[dict[str, Any]] = []
    for raw in emails:
        recipient = find_recipient(session, raw)
        member = None if recipient is None else session.get(GroupMember, (group.id, recipient.id))
        outcome = "unknown" if recipient is None else "not_member" if member is None else "removed"
        if member is not None:
            session.delete(member)
        results.append({"input": raw, "outcome": outcome})
    session.flush()
    return results


def group_recipients(session: Session, ref: str | int, *, active_only: bool = False) -> Selection:
    """The selection of a group's members (or its active ones), for `recipients.iter_recipients`."""
    from campaign_manager.models import ACTIVE
    from campaign_manager.services.recipients import select_recipients

    return select_recipients(session, group=get_group(session, ref).id, status=ACTIVE if active_only else None)
