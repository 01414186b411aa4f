"""Listings of recipients: a `Selection` (status, group, search, limit, offset) read a page at a time, so a
listing of a million recipients runs in flat memory."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, func, inspect, or_, type_coerce
from sqlalchemy.types import NullType
from sqlmodel import Session, select

from campaign_manager.audience import consent
from campaign_manager.audience.groups import get_group
from campaign_manager.errors import InvalidInput
from campaign_manager.states import RecipientStatus
from campaign_manager.tables.audience import Group, GroupMember, Recipient

# The tables a listing reads, as tables: a query over them costs no ORM set-up (the first ORM query of a process
# configures the mappers of every table, which costs more than a listing's own queries: ~2% of a command's start).
_RECIPIENTS = inspect(Recipient).local_table
_MEMBERS = inspect(GroupMember).local_table
_GROUPS = inspect(Group).local_table

# Recipients a page of a listing reads at once: large enough that the queries per page cost little (pages of 500
# are ~15% slower, of 5,000 no faster), small enough that a page (~1 KB a row as Python objects) stays a few MB.
PAGE_ROWS = 2_000


# The columns a listing reads: plain rows of the driver's values, not ORM objects (half the time a row).
_COLUMNS = (
    "id",
    "email",
    "name",
    "phone",
    "status",
    "attributes",
    "opt_out_reason",
    "opted_out_at",
    "created_at",
    "updated_at",
)


@dataclass(frozen=True)
class Selection:
    """Which recipients a listing takes (already checked: the group exists, limit and offset are sane)."""

    status: str | None = None
    group_id: int | None = None
    search: str | None = None
    limit: int | None = None
    offset: int = 0

    def conditions(self, *, after: int | None = None) -> list[ColumnElement[bool]]:
        """The WHERE of the selection; with `after`, of its page that starts after that id."""
        where: list[ColumnElement[bool]] = [] if after is None else [_RECIPIENTS.c.id > after]
        if self.status == RecipientStatus.ACTIVE:
            where.append(consent.mailable())
        elif self.status is not None:
            where.append(_RECIPIENTS.c.status == self.status)
        if self.group_id is not None:
            # EXISTS rather than a join, so that a page is still one row per recipient. The page's start is said
            # again for group_member: PostgreSQL does not carry `recipient.id > after` over to it, and merging
            # from the group's first member read every earlier membership again for every page.
            members = select(_MEMBERS.c.recipient_id).where(
                _MEMBERS.c.group_id == self.group_id, _MEMBERS.c.recipient_id == _RECIPIENTS.c.id
            )
            if after is not None:
                members = members.where(_MEMBERS.c.recipient_id > after)
            where.append(members.exists())
        if self.search:
            # Lowercase on both sides rather than ILIKE: SQLite's LIKE ignores case for ASCII only (db.py gives
            # SQLite a Unicode lower()). autoescape makes % and _ in the search text match themselves.
            text = self.search.lower()
            where.append(
                or_(
                    _RECIPIENTS.c.email_key.contains(text, autoescape=True),
                    func.lower(_RECIPIENTS.c.name).contains(text, autoescape=True),
                )
            )
        return where


def select_recipients(
    session: Session,
    *,
    status: str | None = None,
    group: str | int | None = None,
    search: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> Selection:
    """Check a listing's options (the group must exist) before anything is read or printed."""
    if (limit is not None and limit < 0) or offset < 0:
        raise InvalidInput("--limit and --offset must not be negative")
    if status is not None and status not in list(RecipientStatus):
        raise InvalidInput(f"unknown status {status!r}", hint=f"one of {', '.join(RecipientStatus)}")
    group_id = get_group(session, group).id if group is not None else None
    return Selection(status=status, group_id=group_id, search=search or None, limit=limit, offset=offset)


def iter_recipients(session: Session, selection: Selection, *, page_rows: int = PAGE_ROWS) -> Iterator[dict[str, Any]]:
    """The selected recipients as `describe` gives them, by id, read a page at a time: memory stays flat however
    many there are. Pages follow the ids (keyset), so a page costs the same at the end of a million rows as at
    the start; --offset is skipped once, in SQL, by the first page. No query binds more than one page's ids."""
    columns = _listing_columns()
    rid = _RECIPIENTS.c.id
    connection = session.connection()
    left = selection.limit
    last: int | None = None
    while left is None or left > 0:
        size = page_rows if left is None else min(page_rows, left)
        query = select(*columns).where(*selection.conditions(after=last))
        if last is None:
            query = query.offset(selection.offset)
        rows: Sequence[Any] = connection.execute(query.order_by(rid).limit(size)).fetchall()
        if not rows:
            return
        names = _page_group_names(connection, [row[0] for row in rows])
        for row in rows:
            yield _describe_row(row, names.get(row[0], []))
        last = rows[-1][0]
        if left is not None:
            left -= len(rows)
        if len(rows) < size:
            return


def recipients_page(
    session: Session, *, status: str | None = None, group_id: int | None = None, after: int = 0, limit: int
) -> list[dict[str, Any]]:
    """One page of recipients as `describe` gives them (the REST API's listings): ids above `after`, by id, at most
    `limit`; `status` ACTIVE: only mailable ones; `group_id` (checked by the caller): only that group's members. A
    page costs the same at any depth: it walks the recipients' primary key from `after`, or for a group
    group_member's (group_id, recipient_id) key, so a group that holds one recipient in a thousand is read no
    further than its own members. No OFFSET, no count."""
    columns = _listing_columns()
    rid = _RECIPIENTS.c.id
    if group_id is None:
        query = select(*columns).where(rid > after).order_by(rid)
    else:
        # The page's start is said for both tables: PostgreSQL does not carry it over the join, and a merge join
        # would otherwise read every recipient before it.
        member = _MEMBERS.c.recipient_id
        query = (
            select(*columns)
            .select_from(_MEMBERS.join(_RECIPIENTS, rid == member))
            .where(_MEMBERS.c.group_id == group_id, member > after, rid > after)
            .order_by(member)
        )
    if status == RecipientStatus.ACTIVE:
        query = query.where(consent.mailable())
    elif status is not None:
        query = query.where(_RECIPIENTS.c.status == status)
    connection = session.connection()
    rows: Sequence[Any] = connection.execute(query.limit(limit)).fetchall()
    names = _page_group_names(connection, [row[0] for row in rows]) if rows else {}
    return [_describe_row(row, names.get(row[0], [])) for row in rows]


def _listing_columns() -> list[Any]:
    """The columns a listing reads, as the driver hands them back (no SQLAlchemy type processing per cell:
    _describe_row converts them), the attributes as text on both backends: psycopg's own JSON loading costs four
    times what _json_value does."""
    columns: dict[str, Any] = {name: _RECIPIENTS.c[name] for name in _COLUMNS}
    columns["attributes"] = cast(_RECIPIENTS.c.attributes, Text)
    return [type_coerce(column, NullType()).label(name) for name, column in columns.items()]


def _page_group_names(connection: Any, ids: list[int]) -> dict[int, list[str]]:
    """The group names of one page's recipients (ids ascending), by name. A dense page (most recipients listed,
    the usual case) reads the memberships of its id range in one index range scan, at a third of the cost of a
    lookup per recipient; a sparse one (a selective filter) looks up its own ids."""
    member, name = _MEMBERS.c.recipient_id, _GROUPS.c.name
    query = select(member, name).select_from(_MEMBERS.join(_GROUPS, _GROUPS.c.id == _MEMBERS.c.group_id))
    if ids[-1] - ids[0] < 2 * len(ids):
        query = query.where(member.between(ids[0], ids[-1]))
    else:
        query = query.where(member.in_(ids))
    names: dict[int, list[str]] = {}
    for rid, group_name in connection.execute(query.order_by(member, name)).fetchall():
        names.setdefault(rid, []).append(group_name)
    return names


def count_recipients(session: Session, selection: Selection) -> int:
    """How many recipients the selection takes, ignoring its limit and offset."""
    query = select(func.count()).select_from(_RECIPIENTS).where(*selection.conditions())
    return int(session.execute(query).scalar_one())


def _describe_row(row: Any, groups: list[str]) -> dict[str, Any]:
    """`describe`, from the values of _COLUMNS: a listing's row as the driver hands it back, or a Recipient's."""
    rid, email, name, phone, status, attributes, reason, opted_out_at, created_at, updated_at = row
    return {
        "id": rid,
        "email": email,
        "name": name,
        "phone": phone,
        "status": status,
        "groups": groups,
        "attributes": _json_value(attributes),
        "opt_out_reason": reason,
        "opted_out_at": _utc(opted_out_at),
        "created_at": _utc(created_at),
        "updated_at": _utc(updated_at),
    }


def _json_value(value: Any) -> Any:
    """A JSON column's value: SQLite hands back the text (as json.dumps wrote it); psycopg, and the model, the
    decoded value."""
    if not isinstance(value, str):
        return value
    try:
        decoded, end = _scan_json(value, 0)
    except StopIteration:
        return json.loads(value)  # leading white space, say: let json.loads say what is wrong
    return decoded if end == len(value) else json.loads(value)


def _utc(value: Any) -> datetime | None:
    """What UtcDateTime gives, from the driver's value (SQLite's text, naive, in UTC; psycopg's aware datetime) or
    from UtcDateTime itself."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value + "+00:00")
        except ValueError:
            value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)  # type: ignore[no-any-return]


def group_recipients(session: Session, ref: str | int, *, active_only: bool = False) -> Selection:
    """The selection of a group's members (or its active ones), for `recipients.iter_recipients`."""
    return select_recipients(
        session, group=get_group(session, ref).id, status=RecipientStatus.ACTIVE if active_only else None
    )


# These two run three times a row of a million-row listing, where json.loads and datetime.replace(tzinfo=...)
# cost 3-4 µs a call and the C functions below a fifth of that.
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
