"""Campaigns: what to send and to whom; a draft is changed or deleted here (sending is `service`'s)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import func, union
from sqlmodel import Session, col, delete, select

from campaign_manager import limits
from campaign_manager.audience import consent
from campaign_manager.audience.addresses import normalize_email
from campaign_manager.audience.groups import get_group
from campaign_manager.audience.recipients import get_recipient
from campaign_manager.errors import Conflict, InvalidInput, NotFound
from campaign_manager.states import CampaignStatus
from campaign_manager.tables.audience import Group, GroupMember, Recipient
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.sending import Campaign, CampaignGroup, CampaignRecipient, Delivery


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
    if not title.strip() or not subject.strip():
        raise InvalidInput("a campaign needs a non-empty --title and --subject")
    if "\n" in subject or "\r" in subject:
        raise InvalidInput("the subject must be one line")
    if not text.strip():
        raise InvalidInput("the text body is empty")
    limits.check("the title", title.strip(), limits.TITLE)
    limits.check("the subject", subject.strip(), limits.SUBJECT)
    _check_bodies(subject.strip(), text, html)
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


def _check_bodies(subject: str, text: str, html: str | None) -> None:
    from campaign_manager.sending.render import check_templates  # Jinja2: loaded only by the commands that need it

    check_templates(subject, text, html)


def update_campaign(
    session: Session,
    ref: str | int,
    *,
    title: str | None = None,
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    from_address: str | None = None,
) -> Campaign:
    """Change a draft (a campaign that has started sending keeps what it was sent with)."""
    campaign = get_campaign(session, ref)
    if campaign.status != CampaignStatus.DRAFT:
        raise Conflict(f"campaign {campaign.id} is {campaign.status}; only a draft can be changed")
    if title is not None:
        if not title.strip():
            raise InvalidInput("the title is empty")
        campaign.title = limits.check("the title", title.strip(), limits.TITLE) or campaign.title
    if subject is not None:
        if not subject.strip() or "\n" in subject or "\r" in subject:
            raise InvalidInput("the subject must be one non-empty line")
        campaign.subject = limits.check("the subject", subject.strip(), limits.SUBJECT) or campaign.subject
    if text is not None:
        if not text.strip():
            raise InvalidInput("the text body is empty")
        campaign.body_text = text
    if html is not None:
        campaign.body_html = html or None
    if from_address is not None:
        campaign.from_address = normalize_email(from_address) if from_address else None
    _check_bodies(campaign.subject, campaign.body_text, campaign.body_html)
    campaign.updated_at = utcnow()
    session.add(campaign)
    session.flush()
    return campaign


def delete_campaign(session: Session, ref: str | int) -> int:
    """Delete a draft (or a cancelled campaign) with its audience links and ledger."""
    campaign = get_campaign(session, ref)
    if campaign.status not in (CampaignStatus.DRAFT, CampaignStatus.CANCELLED):
        raise Conflict(
            f"campaign {campaign.id} is {campaign.status}; only a draft or a cancelled campaign can be deleted",
            hint="`cm campaign cancel` it first" if campaign.status != CampaignStatus.SENT else None,
        )
    cid = int(campaign.id or 0)
    for table in (Delivery, CampaignGroup, CampaignRecipient):
        session.exec(delete(table).where(col(table.campaign_id) == cid))
    session.delete(campaign)
    session.flush()
    return cid


# Campaigns a page of `cm campaign list` describes at once (their counts come a query per page, not per campaign).
PAGE_CAMPAIGNS = 100


def iter_campaigns(session: Session, *, page_rows: int = PAGE_CAMPAIGNS) -> Iterator[dict[str, Any]]:
    """Every campaign, by id, as `describe_campaigns` gives them, a page at a time."""
    last = 0
    while True:
        page = list(
            session.exec(select(Campaign).where(col(Campaign.id) > last).order_by(col(Campaign.id)).limit(page_rows))
        )
        yield from describe_campaigns(session, page)
        if len(page) < page_rows:
            return
        last = page[-1].id or 0


def campaigns_page(session: Session, *, after: int = 0, limit: int) -> list[dict[str, Any]]:
    """One page of campaigns as `describe_campaigns` gives them (the REST API's listing): ids above `after`, by id,
    at most `limit`."""
    page = session.exec(select(Campaign).where(col(Campaign.id) > after).order_by(col(Campaign.id)).limit(limit))
    return describe_campaigns(session, list(page))


def _targets(first: int, last: int) -> Any:
    """(campaign_id, recipient_id) for the campaigns first..last: the members of their groups and their named
    recipients, each pair once, whatever their status."""
    in_groups = (
        select(CampaignGroup.campaign_id, GroupMember.recipient_id)
        .join(GroupMember, col(GroupMember.group_id) == CampaignGroup.group_id)
        .where(col(CampaignGroup.campaign_id).between(first, last))
    )
    named = select(CampaignRecipient.campaign_id, CampaignRecipient.recipient_id).where(
        col(CampaignRecipient.campaign_id).between(first, last)
    )
    return union(in_groups, named).subquery("targets")


def audience_query(campaign_id: int) -> Any:
    """Distinct mailable recipient ids of a campaign: members of its groups plus its named recipients. One IN
    over a UNION, which both databases run as a semi-join: `IN (groups) OR IN (named)` made PostgreSQL test every
    recipient against a list of all the others (hours, at a million recipients)."""
    targets = _targets(campaign_id, campaign_id)
    return select(Recipient.id).where(consent.mailable(), col(Recipient.id).in_(select(targets.c.recipient_id)))


def audience_size(session: Session, campaign_id: int) -> int:
    return _audience_sizes(session, campaign_id, campaign_id).get(campaign_id, 0)


def _audience_sizes(session: Session, first: int, last: int) -> dict[int, int]:
    """campaign id -> audience, for the campaigns first..last, in one query."""
    targets = _targets(first, last)
    query = (
        select(targets.c.campaign_id, func.count())
        .join(Recipient, col(Recipient.id) == targets.c.recipient_id)
        .where(consent.mailable())
        .group_by(targets.c.campaign_id)
    )
    return {cid: count for cid, count in session.execute(query).all()}


def describe_campaigns(session: Session, campaigns: Sequence[Campaign], *, full: bool = False) -> list[dict[str, Any]]:
    """The campaigns as the CLI shows them. A campaign may name a million people: it says how many
    (`named_recipients`), not who (`cm recipient list` and the audience count say the rest). The counts cover
    the id range of `campaigns` (a page of the listing, or one campaign), a query each, never a list of ids."""
    ids = [c.id for c in campaigns if c.id is not None]
    if not ids:
        return []
    first, last = min(ids), max(ids)
    group_rows = session.exec(
        select(CampaignGroup.campaign_id, Group.name)
        .join(Group, col(Group.id) == CampaignGroup.group_id)
        .where(col(CampaignGroup.campaign_id).between(first, last))
        .order_by(col(Group.name))
    ).all()
    named = dict(
        session.exec(
            select(CampaignRecipient.campaign_id, func.count())
            .where(col(CampaignRecipient.campaign_id).between(first, last))
            .group_by(col(CampaignRecipient.campaign_id))
        ).all()
    )
    audiences = _audience_sizes(session, first, last)
    out = []
    for c in campaigns:
        item: dict[str, Any] = {
            "id": c.id,
            "title": c.title,
            "subject": c.subject,
            "status": c.status,
            "from": c.from_address,
            "groups": [name for cid, name in group_rows if cid == c.id],
            "named_recipients": named.get(c.id, 0),
            "audience": audiences.get(c.id or 0, 0),
            "created_at": c.created_at,
        }
        if full:
            item["text"] = c.body_text
            item["html"] = c.body_html
        out.append(item)
    return out
