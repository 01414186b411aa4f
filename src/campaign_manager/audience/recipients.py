"""Recipients: create, find, list, update, export and forget. Consent changes go through `consent`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import Session, col, select

from campaign_manager import limits
from campaign_manager.audience import consent
from campaign_manager.audience.address_keys import email_key
from campaign_manager.audience.addresses import normalize_email, parse_address
from campaign_manager.audience.groups import get_group
from campaign_manager.audience.listing import _COLUMNS, _describe_row
from campaign_manager.audience.signups import signups_of
from campaign_manager.errors import Conflict, ConsentError, InvalidInput, NotFound
from campaign_manager.imports.scrub import rejects_naming, scrub_address
from campaign_manager.states import RecipientStatus
from campaign_manager.tables.audience import Group, GroupMember, Recipient
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import ImportReject
from campaign_manager.tables.sending import Campaign, CampaignRecipient, Delivery


def find_recipient(session: Session, ref: str | int) -> Recipient | None:
    """By id (digits) or by email, case-insensitively."""
    text = str(ref).strip()
    if text.isdigit():
        return session.get(Recipient, int(text))
    try:
        key = email_key(normalize_email(text))
    except InvalidInput:
        key = email_key(text)
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
    normalized = normalize_email(email)
    key = email_key(normalized)
    name, phone, attributes = _clean_name(name), _clean_phone(phone), limits.check_attributes(attributes)
    existing = session.exec(select(Recipient).where(Recipient.email_key == key)).first()
    if existing is not None and consent.may_add(existing.status, forgotten=False) is not None:
        raise ConsentError(
            f"{existing.email} opted out (id {existing.id}); creating it again would not make it active",
            hint="only `cm recipient opt-in` does that",
        )
    if existing is not None and existing.status != RecipientStatus.PENDING:
        raise Conflict(
            f"recipient {existing.email} already exists (id {existing.id})", hint="use `cm recipient update`"
        )
    consent.refuse_if_forgotten(session, key)
    targets = [get_group(session, ref) for ref in groups]
    if existing is not None:
        # An unconfirmed sign-up: the operator's create stands for the person's consent, and replaces what the form
        # held (nothing of it was confirmed).
        recipient = existing
        recipient.name, recipient.phone, recipient.attributes = name, phone, dict(attributes or {})
        consent.admit(session, recipient, source="cm recipient create")
    else:
        recipient = consent.new_recipient(normalized, key, name=name, phone=phone, attributes=attributes)
        session.add(recipient)
    session.flush()
    for group in targets:
        if session.get(GroupMember, (group.id, recipient.id)) is None:
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
    clear_bounce: bool = False,
) -> Recipient:
    """Change what is given; an attribute set to the empty string is removed. Status is not changed here:
    that is `consent` (opt_out, opt_in, clear_bounce)."""
    recipient = get_recipient(session, ref)
    if clear_bounce:
        consent.clear_bounce(session, recipient, source="cm recipient update --clear-bounce")
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
    deliveries = session.exec(
        select(  # type: ignore[call-overload]  # sqlmodel's select overloads stop at four columns of these types
            Delivery.campaign_id, Delivery.status, Delivery.attempts, Delivery.last_error, Delivery.sent_at
        )
        .where(Delivery.recipient_id == recipient.id)
        .order_by(col(Delivery.campaign_id))
    ).all()
    data["deliveries"] = [
        {"campaign_id": c, "status": s, "attempts": a, "error": e, "sent_at": t} for c, s, a, e, t in deliveries
    ]
    rejects = session.exec(
        select(ImportReject)
        .where(rejects_naming(recipient.email_key))
        .order_by(col(ImportReject.job_id), col(ImportReject.line))
    ).all()
    data["rejected_import_rows"] = [
        {"job_id": r.job_id, "line": r.line, "reason": r.reason, "row": r.raw} for r in rejects
    ]
    data["signups"] = signups_of(session, int(recipient.id or 0))
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


def opt_out_address(session: Session, ref: str, *, reason: str | None, source: str) -> tuple[Recipient, bool]:
    """`cm recipient opt-out`: opt a recipient (by id or address) out, or an address no recipient holds yet (it is
    recorded as an opted-out recipient). Returns the recipient and whether anything changed."""
    if ref.strip().isdigit():
        recipient = session.get(Recipient, int(ref.strip()))
        if recipient is None:
            raise NotFound(f"no recipient {ref.strip()!r}", hint="give the email address to opt out a new one")
        return consent.opt_out(session, recipient, reason=reason, source=source)
    return consent.opt_out(session, parse_address(ref), reason=reason, source=source)


def opt_in_address(session: Session, ref: str, *, reason: str | None, source: str) -> tuple[Recipient, bool]:
    """`cm recipient opt-in`: reactivate an opted-out recipient, or bring back a forgotten address (as a new,
    active recipient with nothing of the old data). Returns the recipient and whether anything changed."""
    recipient = find_recipient(session, ref)
    if recipient is not None:
        return recipient, consent.opt_in(session, recipient, reason=reason, source=source)
    if not ref.strip().isdigit():
        recipient = consent.opt_in_forgotten(session, parse_address(ref), reason=reason, source=source)
        if recipient is not None:
            return recipient, True
    raise NotFound(f"no recipient {ref!r}", hint="see `cm recipient list`")
