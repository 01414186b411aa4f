"""Who is in which group: adding addresses to a group (through the consent rules, as imports do) and taking
them out."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from sqlmodel import Session, select

from campaign_manager.audience import consent
from campaign_manager.audience.address_keys import email_key
from campaign_manager.audience.addresses import check_email
from campaign_manager.audience.groups import get_group
from campaign_manager.audience.recipients import find_recipient
from campaign_manager.tables.audience import GroupMember, Recipient


class MemberOutcome(StrEnum):
    """What happened to each address given to `add_recipients`."""

    CREATED = "created"  # a new recipient, added to the group
    ADDED = "added"  # an existing recipient, added to the group
    ALREADY_MEMBER = "already_member"
    INVALID = "invalid"  # not an email address (the reason says why)
    SUPPRESSED = "suppressed"  # opted out or forgotten: not added
    DUPLICATE = "duplicate"  # given twice in one call


class RemoveOutcome(StrEnum):
    """What happened to each address given to `remove_recipients`."""

    REMOVED = "removed"
    NOT_MEMBER = "not_member"
    UNKNOWN = "unknown"  # no recipient has that address


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
            result["outcome"] = MemberOutcome.INVALID
            continue
        key = email_key(normalized)
        if key in seen:
            result["outcome"] = MemberOutcome.DUPLICATE
            continue
        seen.add(key)
        recipient = session.exec(select(Recipient).where(Recipient.email_key == key)).first()
        # One lookup an address (they are a handful), not a set of every erased address (there may be millions).
        status = None if recipient is None else recipient.status
        refusal = consent.may_add(status, forgotten=consent.is_forgotten(session, key))
        if refusal is not None:
            result.update(outcome=MemberOutcome.SUPPRESSED, reason=refusal)
            continue
        if recipient is None:
            recipient = consent.new_recipient(normalized, key)
            session.add(recipient)
            session.flush()
            result["outcome"] = MemberOutcome.CREATED
        else:
            # A pending recipient (an unconfirmed sign-up) becomes active: the operator's add stands for consent.
            consent.admit(session, recipient, source="cm group add-recipients")
            if session.get(GroupMember, (group.id, recipient.id)) is not None:
                result["outcome"] = MemberOutcome.ALREADY_MEMBER
                continue
            result["outcome"] = MemberOutcome.ADDED
        session.add(GroupMember(group_id=group.id, recipient_id=recipient.id))
        session.flush()
    return results


def remove_recipients(session: Session, ref: str | int, emails: Sequence[str]) -> list[dict[str, Any]]:
    """Take addresses out of a group (the recipients stay). Outcome: removed / not_member / unknown."""
    group = get_group(session, ref)
    results: list[dict[str, Any]] = []
    for raw in emails:
        recipient = find_recipient(session, raw)
        member = None if recipient is None else session.get(GroupMember, (group.id, recipient.id))
        if recipient is None:
            outcome = RemoveOutcome.UNKNOWN
        else:
            outcome = RemoveOutcome.NOT_MEMBER if member is None else RemoveOutcome.REMOVED
        if member is not None:
            session.delete(member)
        results.append({"input": raw, "outcome": outcome})
    session.flush()
    return results
