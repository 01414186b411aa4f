"""Recipients: create, find, list, update, export and forget. Consent changes go through `consent`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, func, or_, type_coerce
from sqlalchemy.types import NullType
from sqlmodel import Session, col, select

from campaign_manager import limits
from campaign_manager.errors import Conflict, ConsentError, InvalidInput, NotFound
from campaign_manager.models import (
    ACTIVE,
    OPTED_OUT,
    Campaign,
    CampaignRecipient,
    Group,
    GroupMember,
    ImportReject,
    Recipient,
    utcnow,
)
from campaign_manager.services import consent
from campaign_manager.services.emails import email_key, normalize_email
from campaign_manager.services.import_scrub import rejects_naming, scrub_address


def find_recipient(session: Session, ref: str | int) -> Recipient | None:
    """By id (digits) or by email, case-insensitively."""
    text = str(ref).strip()
    if text.isdigit():
        return session.get(Recipient, int(text))
    try:
        key = email_key(normalize_email(text))
    except InvalidInput:
        key = text.lower()
    return session.exec(select(Recipient).where(Recipient.email_key == key)).first()


def get_recipient(session: Session, ref: str | int) -> Recipient:
    recipient = find_recipient(session, ref)
    if recipient is None:
        raise NotFound(f"no recipient {str(ref)!r}", hint="see `cm recipient list`")
    return recipient


def _clean_phone(phone: str | None) -> str | None:
    if phone is None:
        return None
    phone = phone.strip()
    if phone and not all(ch.isdigit() or ch in "+-(). " for ch in phone):
        raise InvalidInput(f"invalid phone number {phone[:60]!r}: use digits, spaces and + - ( ) .")
    return limits.check("the phone number", phone, limits.PHONE) or None


def _clean_name(name: str | None) -> str | None:
    return limits.check("the name", name, limits.NAME)


def create_recipient(
    session: Session,
    email: str,
    *,
    name: str | None = None,
    phone: str | None = None,
    attributes: dict[str, Any] | None = None,
    groups: Sequence[str] = (),
) -> Recipient:
    from campaign_manager.services.groups import get_group

    normalized = normalize_email(email)
    key = email_key(normalized)
    name, phone, attributes = _clean_name(name), _clean_phone(phone), limits.check_attributes(attributes)
    existing = session.exec(select(Recipient).where(Recipient.email_key == key)).first()
    if existing is not None and existing.status == OPTED_OUT:
        raise ConsentError(
            f"{existing.email} opted out (id {existing.id}); creating it again would not make it active",
            hint="only `cm recipient opt-in` does that",
        )
    if existing is not None:
        raise Conflict(
            f"recipient {existing.email} already exists (id {existing.id})", hint="use `cm recipient update`"
        )
    consent.refuse_if_forgotten(session, key)
    targets = [get_group(session, ref) for ref in groups]
    recipient = Recipient(email=normalized, email_key=key, name=name, phone=phone, attributes=attributes)
    session.add(recipient)
    session.flush()
    for group in targets:
        session.add(GroupMember(group_id=group.id, recipient_id=recipient.id))
    session.flush()
    return recipient


def update_recipient(
    session: Session,
    ref: str | int,
    *,
    name: str | None = None,
    phone: str | None = None,
    attributes: dict[str, Any] | None = None,
    add_groups: Sequence[str] = (),
    remove_groups: Sequence[str] = (),
) -> Recipient:
    """Change what is given; an attribute set to the empty string is removed. Status is not changed here:
    that is `consent.opt_out` / `consent.opt_in`."""
    from campaign_manager.services.groups import get_group

    recipient = get_recipient(session, ref)
    limits.check_attributes(attributes)
    if name is not None:
        recipient.name = _clean_name(name) or None
    if phone is not None:
        recipient.phone = _clean_phone(phone)
    if attributes:
        merged = dict(recipient.attributes)
        for key, value in attributes.items():
            if value == "":
                merged.pop(key, None)
            else:
                merged[key] = value
        recipient.attributes = merged
    for ref_ in add_groups:
        group = get_group(session, ref_)
        if session.get(GroupMember, (group.id, recipient.id)) is None:
            session.add(GroupMember(group_id=group.id, recipient_id=recipient.id))
    for ref_ in remove_groups:
        group = get_group(session, ref_)
        member = session.get(GroupMember, (group.id, recipient.id))
        if member is not None:
            session.delete(member)
    recipient.updated_at = utcnow()
    session.flush()
    return recipient


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
        where: list[ColumnElement[bool]] = [] if after is None else [col(Recipient.id) > after]
        if self.status == ACTIVE:
            where.append(consent.mailable())
        elif self.status == OPTED_OUT:
            where.append(col(Recipient.status) == OPTED_OUT)
        if self.group_id is not None:
            # EXISTS rather than a join, so that a page is still one row per recipient. The page's start is said
            # again for group_member: PostgreSQL does not carry `recipient.id > after` over to it, and merging
            # from the group's first member read every earlier membership again for every page.
            members = select(GroupMember.recipient_id).where(
                GroupMember.group_id == self.group_id, GroupMember.recipient_id == Recipient.id
            )
            if after is not None:
                members = members.where(col(GroupMember.recipient_id) > after)
            where.append(members.exists())
        if self.search:
            # Lowercase on both sides rather than ILIKE: SQLite's LIKE ignores case for ASCII only (db.py gives
            # SQLite a Unicode lower()). autoescape makes % and _ in the search text match themselves.
            text = self.search.lower()
            where.append(
                or_(
                    col(Recipient.email_key).contains(text, autoescape=True),
                    func.lower(col(Recipient.name)).contains(text, autoescape=True),
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
    from campaign_manager.services.groups import get_group

    if (limit is not None and limit < 0) or offset < 0:
        raise InvalidInput("--limit and --offset must not be negative")
    if status not in (None, ACTIVE, OPTED_OUT):
        raise InvalidInput(f"unknown status {status!r}", hint=f"one of {', '.join((ACTIVE, OPTED_OUT))}")
    group_id = get_group(session, group).id if group is not None else None
    return Selection(status=status, group_id=group_id, search=search or None, limit=limit, offset=offset)


def iter_recipients(session: Session, selection: Selection, *, page_rows: int = PAGE_ROWS) -> Iterator[dict[str, Any]]:
    """The selected recipients as `describe` gives them, by id, read a page at a time: memory stays flat however
    many there are. Pages follow the ids (keyset), so a page costs the same at the end of a million rows as at
    the start; --offset is skipped once, in SQL, by the first page. No query binds more than one page's ids."""
    columns = _listing_columns()
    rid = col(Recipient.id)
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


def _listing_columns() -> list[Any]:
    """The columns a listing reads, as the driver hands them back (no SQLAlchemy type processing per cell:
    _describe_row converts them), the attributes as text on both backends: psycopg's own JSON loading costs four
    times what _json_value does."""
    columns = {name: getattr(Recipient, name) for name in _COLUMNS}
    columns["attributes"] = cast(col(Recipient.attributes), Text)
    return [type_coerce(column, NullType()).label(name) for name, column in columns.items()]


def _page_group_names(connection: Any, ids: list[int]) -> dict[int, list[str]]:
    """The group names of one page's recipients (ids ascending), by name. A dense page (most recipients listed,
    the usual case) reads the memberships of its id range in one index range scan, at a third of the cost of a
    lookup per recipient; a sparse one (a selective filter) looks up its own ids."""
    member = col(GroupMember.recipient_id)
    query = select(member, Group.name).join(Group, col(Group.id) == GroupMember.group_id)
    if ids[-1] - ids[0] < 2 * len(ids):
        query = query.where(member.between(ids[0], ids[-1]))
    else:
        query = query.where(member.in_(ids))
    names: dict[int, list[str]] = {}
    for rid, name in connection.execute(query.order_by(member, col(Group.name))).fetchall():
        names.setdefault(rid, []).append(name)
    return names


def count_recipients(session: Session, selection: Selection) -> int:
    """How many recipients the selection takes, ignoring its limit and offset."""
    query = select(func.count()).select_from(Recipient).where(*selection.conditions())
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


# These two run three times a row of a million-row listing, where json.loads and datetime.replace(tzinfo=...)
# cost 3-4 µs a call and the C functions below a fifth of that.
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


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


def group_names(session: Session, recipient_id: int) -> list[str]:
    """One recipient's group names, by name."""
    return list(
        session.exec(
            select(Group.name)
            .join(GroupMember, col(GroupMember.group_id) == Group.id)
            .where(GroupMember.recipient_id == recipient_id)
            .order_by(col(Group.name))
        ).all()
    )


def describe(recipient: Recipient, groups: list[str]) -> dict[str, Any]:
    """The recipient as the CLI shows it (table and --json alike)."""
    return _describe_row(tuple(getattr(recipient, name) for name in _COLUMNS), groups)


def describe_many(session: Session, recipients: Sequence[Recipient]) -> list[dict[str, Any]]:
    """A few recipients (show, create, update, opt-out, ...) with their group names, a query each; listings
    use `iter_recipients`."""
    return [describe(r, group_names(session, r.id or 0)) for r in recipients]


def export_recipient(session: Session, ref: str | int) -> dict[str, Any]:
    """Everything held about one person (GDPR access request): their record, consent history, the campaigns that
    name them, and the import rows that were rejected with their address in them."""
    recipient = get_recipient(session, ref)
    data = describe_many(session, [recipient])[0]
    data["consent_history"] = consent.history(session, recipient)
    named = session.exec(
        select(Campaign.id, Campaign.title)
        .join(CampaignRecipient, col(CampaignRecipient.campaign_id) == Campaign.id)
        .where(CampaignRecipient.recipient_id == recipient.id)
        .order_by(col(Campaign.id))
    ).all()
    data["campaigns"] = [{"id": cid, "title": title} for cid, title in named]
    rejects = session.exec(
        select(ImportReject)
        .where(rejects_naming(recipient.email_key))
        .order_by(col(ImportReject.job_id), col(ImportReject.line))
    ).all()
    data["rejected_import_rows"] = [
        {"job_id": r.job_id, "line": r.line, "reason": r.reason, "row": r.raw} for r in rejects
    ]
    return data


def forget_recipient(session: Session, ref: str, *, source: str) -> dict[str, Any]:
    """`cm recipient forget`: erase the person (consent.forget) and take their address out of every staged upload
    and rejected import row. `ref` may be an address no recipient holds (one a queued import would bring, say):
    it is suppressed all the same. What it returns names the recipient by id, never by address."""
    recipient = find_recipient(session, ref)
    if recipient is not None:
        key = recipient.email_key
    elif ref.strip().isdigit():
        raise NotFound(f"no recipient {ref.strip()!r}", hint="give the email address to forget one cm never held")
    else:
        key = email_key(normalize_email(ref))
    rid = None if recipient is None else recipient.id
    digest, changed = consent.forget(session, key, recipient=recipient, source=source)
    uploads = scrub_address(session, key)
    return {"id": rid, "forgotten": True, "changed": changed, "suppression_hash": digest, "staged_uploads": uploads}


def opt_in_address(session: Session, ref: str, *, reason: str | None, source: str) -> tuple[Recipient, bool]:
    """`cm recipient opt-in`: reactivate an opted-out recipient, or bring back a forgotten address (as a new,
    active recipient with nothing of the old data). Returns the recipient and whether anything changed."""
    recipient = find_recipient(session, ref)
    if recipient is not None:
        return recipient, consent.opt_in(session, recipient, reason=reason, source=source)
    if not ref.strip().isdigit() and consent.opt_in_forgotten(session, ref, reason=reason, source=source):
        normalized = normalize_email(ref)
        recipient = Recipient(email=normalized, email_key=email_key(normalized))
        session.add(recipient)
        session.flush()
        return recipient, True
    raise NotFound(f"no recipient {ref!r}", hint="see `cm recipient list`")
