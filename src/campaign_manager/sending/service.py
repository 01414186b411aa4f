"""Sending a campaign: what `send` checks and queues, and the states around it (pause, resume, cancel, retry). The
send job itself is `job`'s.

A campaign goes draft -> scheduled (queued, maybe for later) -> sending (its ledger is written) -> sent (nothing
pending), or paused (by `cm campaign pause`, a signal during `--wait`, a notifier down past `send.max_outage`, a
scheduled start found later than `send.max_delay`) and resumed, or cancelled. The send job is safe to run again at
any point: the ledger says what is done, so a crash, a restart or a second worker re-sends nothing recorded.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

from sqlmodel import Session

from campaign_manager.audience import consent
from campaign_manager.db import open_session
from campaign_manager.errors import ConfigError, Conflict, InvalidInput
from campaign_manager.jobs.records import create_job
from campaign_manager.notifiers import Need, load_errors, load_notifiers
from campaign_manager.sending import ledger
from campaign_manager.sending.campaigns import get_campaign
from campaign_manager.states import CampaignStatus
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import Job
from campaign_manager.tables.sending import Campaign

if TYPE_CHECKING:
    from campaign_manager.config import Settings
    from campaign_manager.sending.render import Renderer

KIND = "send"
log = logging.getLogger("campaign_manager.send")
ENDED = (CampaignStatus.SENT, CampaignStatus.CANCELLED)


class Queued(NamedTuple):
    """What `queue_send` did: the job it made (None when there was nothing to do) and one line saying so."""

    job: Job | None
    message: str


# ----------------------------------------------------------------------------------------------- checks


def resolve_notifier(settings: Settings, name: str | None) -> tuple[str, type]:
    """The notifier to send with: `--notifier`, else `send.notifier`; never a default (a missing SMTP setting
    must not "send" a campaign into a folder)."""
    installed = load_notifiers()
    choices = ", ".join(sorted(installed)) or "none installed"
    chosen = name or settings.send.notifier
    if not chosen:
        raise ConfigError(
            "no notifier to send with: set send.notifier in campaign.toml (or CM_SEND_NOTIFIER), or pass --notifier",
            hint=f"installed: {choices}",
        )
    if chosen not in installed:
        failed = load_errors().get(chosen)
        why = f"the notifier {chosen!r} failed to load ({failed})" if failed else f"no notifier {chosen!r}"
        raise ConfigError(why, hint=f"installed: {choices}; see `cm plugins`")
    return chosen, installed[chosen]


def from_header(settings: Settings, campaign: Campaign) -> str:
    """The From of the campaign's messages: its own address, else `send.from`."""
    value = campaign.from_address or settings.send.from_
    if not value.strip():
        raise ConfigError(
            "no From address: set send.from in campaign.toml (or CM_SEND_FROM), or create the campaign with --from"
        )
    from email.utils import parseaddr

    if "@" not in parseaddr(value)[1] or "\n" in value or "\r" in value:
        raise ConfigError(f'send.from {value!r} is not an address (expected "Name <news@example.com>")')
    return value


def check_campaign(settings: Settings, campaign: Campaign) -> None:
    """What `send` refuses before queueing anything: templates that do not compile, no From."""
    from campaign_manager.sending.render import check_templates

    check_templates(campaign.subject, campaign.body_text, campaign.body_html)
    from_header(settings, campaign)
    if settings.unsubscribe.url and "{token}" not in settings.unsubscribe.url:
        raise ConfigError("unsubscribe.url must contain {token}")


def make_renderer(
    session: Session, settings: Settings, campaign: Campaign, *, need: Need, test: bool = False
) -> Renderer:
    """The renderer of a campaign's messages, as the send job, a preview and a test copy all use it: its From, the
    database's id (the idempotency keys) and the signing secrets (the unsubscribe tokens)."""
    from campaign_manager.sending.render import Renderer

    database_id, own_secret = ledger.identity(session)
    return Renderer(
        campaign,
        from_header=from_header(settings, campaign),
        database_id=database_id,
        secrets=ledger.signing_secrets(settings, own_secret),
        unsubscribe=settings.unsubscribe,
        max_message_bytes=settings.send.max_message_bytes,
        need=need,
        test=test,
    )


def uses_unsubscribe_link(campaign: Campaign) -> bool:
    return any("unsubscribe_url" in (body or "") for body in (campaign.body_text, campaign.body_html))


def parse_at(text: str) -> datetime:
    """`--at`: ISO 8601; without an offset, the local time of this machine. Returned in UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"--at {text!r} is not an ISO 8601 time", hint="e.g. 2026-12-01T09:00 or 2026-12-01T09:00+01:00"
        ) from None
    try:
        if when.tzinfo is None:
            when = when.astimezone()  # the machine's local time
        return when.astimezone(UTC)
    except (OverflowError, ValueError):  # 0001-01-01T00:30+01:00 is before the first day Python can hold
        raise InvalidInput(f"--at {text!r} is out of range", hint="give a time between the years 1 and 9999") from None


# ----------------------------------------------------------------------------------------------- queueing


def queue_send(
    session: Session,
    settings: Settings,
    ref: str | int,
    *,
    notifier: str | None = None,
    at: datetime | None = None,
    rate: float | None = None,
    new: bool = False,
) -> Queued:
    """Queue a campaign's send (the caller commits and enqueues the job: `jobs.queue.submit_job`). A campaign
    already sent or sending gets nothing new unless `new` (audience members not yet in its ledger)."""
    campaign = get_campaign(session, ref)
    cid = int(campaign.id or 0)
    if rate is not None and rate <= 0:
        raise InvalidInput("--rate must be more than 0 (messages per second)")
    status = CampaignStatus(campaign.status)
    if status == CampaignStatus.CANCELLED:
        raise Conflict(f"campaign {cid} was cancelled; it cannot be sent again", hint="create a new campaign")
    if status == CampaignStatus.PAUSED:
        raise Conflict(f"campaign {cid} is paused ({campaign.status_reason})", hint=f"`cm campaign resume {cid}`")
    if status != CampaignStatus.DRAFT and not new:
        what = "was sent" if status == CampaignStatus.SENT else f"is already {status}"
        return Queued(None, f"campaign {cid} {what}; nothing new to send (`--new` adds people not yet in its ledger)")
    name, cls = resolve_notifier(settings, notifier or campaign.notifier)
    cls(settings.notifiers[name])  # its settings are checked now (a missing url, say: exit 7), not in the worker
    check_campaign(settings, campaign)
    now = utcnow()
    if status == CampaignStatus.DRAFT:
        campaign.scheduled_at = at or now
        campaign.status = CampaignStatus.SCHEDULED
    else:  # --new: write the ledger again from the start; rows already in it stay as they are
        campaign.ledger_through, campaign.ledger_done = 0, False
        campaign.status, campaign.finished_at = CampaignStatus.SENDING, None
    campaign.notifier, campaign.status_reason, campaign.updated_at = name, None, now
    if rate is not None:
        campaign.rate = rate
    session.add(campaign)
    job = create_job(session, KIND, {"campaign_id": cid})
    when = "" if at is None or at <= now else f" for {at.astimezone().isoformat(timespec='minutes')}"
    return Queued(job, f"queued the send of campaign {cid} through {name}{when} as job {job.id}")


# ------------------------------------------------------------------------------------ pause, resume, cancel


def set_status(campaign: Campaign, status: CampaignStatus, reason: str | None) -> None:
    campaign.status, campaign.status_reason, campaign.updated_at = status, reason, utcnow()
    if status == CampaignStatus.SENT:
        campaign.finished_at = utcnow()


def pause(session: Session, ref: str | int) -> Campaign:
    campaign = get_campaign(session, ref)
    if campaign.status not in (CampaignStatus.SCHEDULED, CampaignStatus.SENDING):
        raise Conflict(f"campaign {campaign.id} is {campaign.status}; only a scheduled or sending one can be paused")
    set_status(campaign, CampaignStatus.PAUSED, "paused by `cm campaign pause`")
    session.add(campaign)
    return campaign


def resume(session: Session, ref: str | int) -> tuple[Campaign, Job]:
    """paused -> sending (or scheduled, if it never started), with a new job; the caller enqueues it."""
    campaign = get_campaign(session, ref)
    if campaign.status != CampaignStatus.PAUSED:
        raise Conflict(f"campaign {campaign.id} is {campaign.status}, not paused")
    status = CampaignStatus.SENDING if campaign.ledger_done else CampaignStatus.SCHEDULED
    if campaign.started_at is None:
        campaign.scheduled_at = utcnow()  # resumed now: no longer late
    set_status(campaign, status, None)
    session.add(campaign)
    return campaign, create_job(session, KIND, {"campaign_id": campaign.id})


def cancel(url: str, ref: str | int) -> dict[str, int]:
    """Cancel: no more messages; pending deliveries become `skipped` (reason `cancelled`), a segment a
    transaction."""
    with open_session(url) as session:
        campaign = get_campaign(session, ref)
        cid = int(campaign.id or 0)
        if campaign.status in ENDED:
            raise Conflict(f"campaign {cid} is {campaign.status} already")
        set_status(campaign, CampaignStatus.CANCELLED, "cancelled by `cm campaign cancel`")
        session.add(campaign)
    skipped = 0
    while True:
        with open_session(url) as session:
            done = ledger.cancel_pending(session, cid)
        skipped += done
        if done == 0:
            return {"campaign_id": cid, "skipped": skipped}


def retry(url: str, ref: str | int, *, include_bounced: bool) -> tuple[int, int]:
    """`cm campaign retry`: failed deliveries back to pending (hard bounces only with `include_bounced`).
    Returns (campaign id, deliveries re-queued); the caller queues a send job when any were."""
    with open_session(url, write=False) as session:
        campaign = get_campaign(session, ref)
        cid = int(campaign.id or 0)
        if campaign.status in (CampaignStatus.DRAFT, CampaignStatus.CANCELLED):
            raise Conflict(f"campaign {cid} is {campaign.status}: nothing to retry")
    if include_bounced:
        after = 0
        while True:  # the operator says these addresses are worth another try: their bounces are cleared first
            with open_session(url) as session:
                page = ledger.bounced_recipients(session, cid, after=after)
                for recipient in page:
                    consent.clear_bounce(session, recipient, source=f"cm campaign retry {cid} --include-bounced")
            if not page:
                break
            after = int(page[-1].id or 0)
    again = 0
    while True:
        with open_session(url) as session:
            done = ledger.requeue_failed(session, cid, include_bounced=include_bounced)
        again += done
        if done == 0:
            break
    if again:
        with open_session(url) as session:
            campaign = get_campaign(session, cid)
            if campaign.status == CampaignStatus.SENT:
                set_status(campaign, CampaignStatus.SENDING, None)
                campaign.finished_at = None
                session.add(campaign)
    return cid, again
