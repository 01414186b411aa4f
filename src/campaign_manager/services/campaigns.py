"""Campaigns: what to send and to whom. Sending comes later; a campaign stays a `draft` until then."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from campaign_manager import limits
from campaign_manager.errors import InvalidInput, NotFound
from campaign_manager.models import Campaign, CampaignGroup, CampaignRecipient, Group, GroupMember, Recipient
from campaign_manager.services import consent
from campaign_manager.services.emails import normalize_email


def get_campaign(session: Session, ref: str | int) -> Campaign:
    text = str(ref).strip()
    campaign = session.get(Campaign, int(text)) if text.isdigit() else None
    if campaign is None:
        raise NotFound(f"no campaign {text!r}", hint="see `cm campaign list`")
    return campaign


def create_campaign(
    session: Session,
    *,
    title: str,
    subject: str,
    text: str,
    html: str | None = None,
    from_address: str | None = None,
    groups: Sequence[str] = (),
    recipients: Sequence[str] = (),
) -> Campaign:
    """Create a draft. Groups and recipients must exist; opted-out recipients may be named (they are simply
    never in the audience), forgotten ones cannot be found at all."""
    from campaign_manager.services.groups import get_group
    from campaign_manager.services.recipients import get_recipient

    if not title.strip() or not subject.strip():
        raise InvalidInput("a campaign needs a non-empty --title and --subject")
    if "\n" in subject or "\r" in subject:
        raise InvalidInput("the subject must be one line")
    if not text.strip():
        raise InvalidInput("the text body is empty")
    limits.check("the title", title.strip(), limits.TITLE)
    limits.check("the subject", subject.strip(), limits.SUBJECT)
    sender = normalize_email(from_address) if from_address else None
    target_groups = [get_group(session, ref) for ref in groups]
    target_people = [get_recipient(session, ref) for ref in recipients]
    campaign = Campaign(
        title=title.strip(), subject=subject.strip(), body_text=text, body_html=html, from_address=sender
    )
    session.add(campaign)
    session.flush()
    for group in {g.id: g for g in target_groups}.values():
        session.add(CampaignGroup(campaign_id=campaign.id, group_id=group.id))
    for person in {r.id: r for r in target_people}.values():
        session.add(CampaignRecipient(campaign_id=campaign.id, recipient_id=person.id))
    session.flush()
    return campaign


def list_campaigns(session: Session) -> list[Campaign]:
    return list(session.exec(select(Campaign).order_by(col(Campaign.id))).all())


def audience_query(campaign_id: int) -> Any:
    """Distinct mailable recipient ids of a campaign: members of its groups plus its named recipients."""
    in_groups = (
        select(GroupMember.recipient_id)
        .join(CampaignGroup, col(CampaignGroup.group_id) == GroupMember.group_id)
        .where(CampaignGroup.campaign_id == campaign_id)
    )
    named = select(CampaignRecipient.recipient_id).where(CampaignRecipient.campaign_id == campaign_id)
    return select(Recipient.id).where(
        consent.mailable(), or_(col(Recipient.id).in_(in_groups), col(Recipient.id).in_(named))
    )


def audience_size(session: Session, campaign_id: int) -> int:
    return int(session.exec(select(func.count()).select_from(audience_query(campaign_id).subquery())).one())


def describe_campaigns(session: Session, campaigns: Sequence[Campaign], *, full: bool = False) -> list[dict[str, Any]]:
    ids = [c.id for c in campaigns if c.id is not None]
    group_rows = session.exec(
        select(CampaignGroup.campaign_id, Group.name)
        .join(Group, col(Group.id) == CampaignGroup.group_id)
        .where(col(CampaignGroup.campaign_id).in_(ids))
        .order_by(col(Group.name))
    ).all()
    people_rows = session.exec(
        select(CampaignRecipient.campaign_id, Recipient.email)
        .join(Recipient, col(Recipient.id) == CampaignRecipient.recipient_id)
        .where(col(CampaignRecipient.campaign_id).in_(ids))
        .order_by(col(Recipient.email))
    ).all()
    out = []
    for c in campaigns:
        item: dict[str, Any] = {
            "id": c.id,
            "title": c.title,
            "subject": c.subject,
            "status": c.status,
            "from": c.from_address,
            "groups": [name for cid, name in group_rows if cid == c.id],
            "recipients": [email for cid, email in people_rows if cid == c.id],
            "audience": audience_size(session, c.id or 0),
            "created_at": c.created_at,
        }
        if full:
            item["text"] = c.body_text
            item["html"] = c.body_html
        out.append(item)
    return out
