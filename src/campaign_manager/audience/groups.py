"""Groups: create, find, rename, describe (with member counts) and delete. Members are in `members`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, inspect
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from campaign_manager import limits
from campaign_manager.audience import consent
from campaign_manager.errors import Conflict, InvalidInput, NotFound
from campaign_manager.tables.audience import Group, GroupMember, Recipient
from campaign_manager.tables.base import utcnow

# As tables, for the counts and the listing (see describe_all_groups).
_GROUPS = inspect(Group).local_table
_MEMBERS = inspect(GroupMember).local_table
_RECIPIENTS = inspect(Recipient).local_table


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


def update_group(
    session: Session,
    ref: str | int,
    *,
    name: str | None = None,
    description: str | None = None,
    public: bool | None = None,
) -> Group:
    """Rename a group, change its description, or (`public`) offer it on `cm serve`'s sign-up form or stop."""
    group = get_group(session, ref)
    if name is not None and name.strip() != group.name:
        name = _check_name(name)
        existing = find_group(session, name)
        if existing is not None and existing.id != group.id:
            raise Conflict(f"a group named {existing.name!r} already exists", hint="names are matched ignoring case")
        group.name, group.name_key = name, name_key(name)
    if description is not None:
        group.description = _check_description(description) or None
    if public is not None:
        group.public = public
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
    return [_describe(g.id, g.name, g.description, g.public, g.created_at, counts) for g in groups]


def describe_all_groups(session: Session) -> list[dict[str, Any]]:
    """Every group by name, as `describe_groups` gives it (`cm group list`), read as rows of the table rather than
    as Group objects: the first ORM query of a process sets up the mappers of every table, which costs more than
    the listing itself."""
    table = _GROUPS.c
    query = sa.select(table.id, table.name, table.description, table.public, table.created_at).order_by(table.name)
    rows = session.connection().execute(query).all()
    counts = _member_counts(session, None) if rows else {}
    return [_describe(*row, counts) for row in rows]


def groups_page(session: Session, *, after: int = 0, limit: int) -> list[dict[str, Any]]:
    """One page of groups as `describe_groups` gives them (the REST API's listing): ids above `after`, by id, at most
    `limit`; the counts cover only the page's id range."""
    table = _GROUPS.c
    query = (
        sa.select(table.id, table.name, table.description, table.public, table.created_at)
        .where(table.id > after)
        .order_by(table.id)
        .limit(limit)
    )
    rows = session.connection().execute(query).all()
    counts = _member_counts(session, None, between=(rows[0][0], rows[-1][0])) if rows else {}
    return [_describe(*row, counts) for row in rows]


def _describe(
    gid: int | None,
    name: str,
    description: str | None,
    public: Any,
    created_at: Any,
    counts: dict[int, tuple[int, int]],
) -> dict[str, Any]:
    members, active = counts.get(gid or 0, (0, 0))
    return {
        "id": gid,
        "name": name,
        "description": description,
        "public": bool(public),  # offered on `cm serve`'s sign-up form
        "members": members,
        "active_members": active,
        "created_at": created_at,
    }


def _member_counts(
    session: Session, group_id: int | None, *, between: tuple[int, int] | None = None
) -> dict[int, tuple[int, int]]:
    """group id -> (members, active members), for one group or (None) for all of them (`between`: those whose ids
    are in that range)."""
    member, recipient = _MEMBERS.c, _RECIPIENTS.c
    query = (
        select(member.group_id, func.count(), func.count().filter(consent.mailable()))
        .select_from(_MEMBERS.join(_RECIPIENTS, recipient.id == member.recipient_id))
        .group_by(member.group_id)
    )
    if group_id is not None:
        query = query.where(member.group_id == group_id)
    if between is not None:
        query = query.where(member.group_id.between(*between))
    return {gid: (total, active) for gid, total, active in session.connection().execute(query).all()}
