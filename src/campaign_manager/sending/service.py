"""Sending a campaign: queueing the send, the job that writes the ledger and sends it, and the states around it
(pause, resume, cancel, retry).

A campaign goes draft -> scheduled (queued, maybe for later) -> sending (its ledger is written) -> sent (nothing
pending), or paused (by `cm campaign pause`, a signal during `--wait`, a notifier down past `send.max_outage`, a
scheduled start found later than `send.max_delay`) and resumed, or cancelled. The send job is safe to run again at
any point: the ledger says what is done, so a crash, a restart or a second worker re-sends nothing recorded.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlmodel import Session

from campaign_manager.audience import consent
from campaign_manager.db import open_session
from campaign_manager.errors import ConfigError, Conflict, InvalidInput
from campaign_manager.jobs import runner
from campaign_manager.jobs.records import Progress, create_job, get_job
from campaign_manager.notifiers import Message, Need, Result, load_errors, load_notifiers, needs
from campaign_manager.sending import engine, ledger
from campaign_manager.sending.campaigns import get_campaign
from campaign_manager.states import CampaignStatus
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import Job
from campaign_manager.tables.sending import Campaign

if TYPE_CHECKING:
    from campaign_manager.config import Settings

KIND = "send"
log = logging.getLogger("campaign_manager.send")
# A retry due within this long is waited for in the same run; a later one is a new job, queued for then.
WAIT_IN_RUN = 120.0
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
    if when.tzinfo is None:
        when = when.astimezone()  # the machine's local time
    return when.astimezone(UTC)


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


def job_eta(campaign: Campaign) -> datetime | None:
    """When the send job's message should run (a scheduled send), None for now."""
    when = campaign.scheduled_at
    return when if when is not None and when > utcnow() else None


# ---------------------------------------------------------------------------------------------- the job


def run_send_job(url: str, job_id: int, progress: Progress | None = None) -> dict[str, Any]:
    """The job handler: write the campaign's ledger (or go on writing it), then send what is pending."""
    settings = runner.current_settings()
    if settings is None:
        from campaign_manager.config import load_settings

        settings = load_settings(None)
    with open_session(url, write=False) as session:
        cid = int(get_job(session, job_id).args["campaign_id"])
    if not _start(url, settings, cid):
        return {"campaign_id": cid, "skipped": 1}
    _write_ledger(url, cid)
    return Send(url, settings, cid, progress).run()


def _start(url: str, settings: Settings, cid: int) -> bool:
    """scheduled -> sending (or paused `late`); whether there is anything to do."""
    with open_session(url) as session:
        campaign = get_campaign(session, cid)
        if campaign.status == CampaignStatus.SCHEDULED:
            late = campaign.scheduled_at is not None and utcnow() - campaign.scheduled_at > timedelta(
                seconds=settings.send.max_delay
            )
            if late:
                _set(campaign, CampaignStatus.PAUSED, "late")
                log.warning("campaign %d: its scheduled start has passed by more than send.max_delay: paused", cid)
                return False
            _set(campaign, CampaignStatus.SENDING, None)
            campaign.started_at = campaign.started_at or utcnow()
        session.add(campaign)
        return campaign.status == CampaignStatus.SENDING


def _set(campaign: Campaign, status: CampaignStatus, reason: str | None) -> None:
    campaign.status, campaign.status_reason, campaign.updated_at = status, reason, utcnow()
    if status == CampaignStatus.SENT:
        campaign.finished_at = utcnow()


def _write_ledger(url: str, cid: int) -> None:
    """The ledger, a segment of recipient ids per transaction, going on after the last one committed."""
    while True:
        with open_session(url) as session:
            campaign = get_campaign(session, cid)
            if campaign.ledger_done:
                return
            low = campaign.ledger_through
            if low >= ledger.last_recipient_id(session):
                campaign.ledger_done = True
            else:
                ledger.write_segment(session, cid, low, low + ledger.SEGMENT_IDS)
                campaign.ledger_through = low + ledger.SEGMENT_IDS
            session.add(campaign)


class Send:
    """One run of a send job over the ledger."""

    def __init__(self, url: str, settings: Settings, cid: int, progress: Progress | None) -> None:
        self.url, self.settings, self.cid, self.outer = url, settings, cid, progress
        self.token = secrets.token_hex(10)
        self.stopped_by: BaseException | None = None
        self.signal = runner.defer_interrupts()

    def run(self) -> dict[str, Any]:
        from campaign_manager.sending.render import Renderer

        send = self.settings.send
        with open_session(self.url) as session:
            campaign = get_campaign(session, self.cid)
            database_id, own_secret = ledger.identity(session)
            self.total = sum(v for k, v in ledger.counts(session, self.cid).items() if k != "skipped")
        name, cls = resolve_notifier(self.settings, campaign.notifier)
        self.need = needs(cls)
        config = self.settings.notifiers[name]
        self.renderer = Renderer(
            campaign,
            from_header=from_header(self.settings, campaign),
            database_id=database_id,
            secrets=ledger.signing_secrets(self.settings, own_secret),
            unsubscribe=self.settings.unsubscribe,
            max_message_bytes=send.max_message_bytes,
            need=self.need,
        )
        limits = [r for r in (getattr(config, "rate", 0) or 0, campaign.rate or 0) if r > 0]
        sender = engine.Sender(
            cls(config),
            engine.Hooks(self._claim, self._render, self._record, self._release, self._progress),
            rate=min(limits) if limits else 0.0,
            record_batch=send.record_batch,
            record_interval=send.record_interval,
            max_outage=send.max_outage,
        )
        while True:
            ended = engine.run(sender, poll=self._should_stop)
            if ended == "down":
                self._pause(f"the notifier was down for more than send.max_outage: {sender.totals.down}")
                break
            if ended == "stopped" or self.stopped_by is not None or self.signal():
                break
            wait = self._finish_or_wait()
            if wait is None:
                break
            if wait > WAIT_IN_RUN:
                self._queue_later(wait)
                break
            if self._sleep(wait):
                break
            sender.stopping = False
        signum = self.signal()
        if signum:
            import signal as signals

            self._pause(f"interrupted by {signals.Signals(signum).name}")
        if self.stopped_by is not None:
            raise self.stopped_by  # the worker gave the job back: another run goes on from the ledger
        with open_session(self.url, write=False) as session:
            counts = ledger.counts(session, self.cid)
        return {"campaign_id": self.cid, **counts, "interrupted": signum}

    # -- hooks (each runs in a thread)

    def _claim(self) -> list[Any] | None:
        with open_session(self.url) as session:
            campaign = session.get(Campaign, self.cid)
            if campaign is None or campaign.status != CampaignStatus.SENDING:
                return None
            return ledger.claim(
                session,
                self.cid,
                token=self.token,
                limit=self.settings.send.claim_batch,
                lease=self.settings.worker.lease_seconds,
            )

    def _render(self, target: ledger.Target) -> Message | Result:
        from campaign_manager.sending.render import RenderError, Target

        if self.need == Need.PHONE and not target.phone:
            return Result.skipped("no phone")
        try:
            return self.renderer.render(
                Target(
                    target.delivery_id, target.recipient_id, target.email, target.name, target.phone, target.attributes
                )
            )
        except RenderError as exc:
            return Result.failed(exc.reason)

    def _record(self, items: list[tuple[Any, Result]]) -> None:
        send = self.settings.send
        with open_session(self.url) as session:
            ledger.record(
                session,
                self.token,
                items,
                max_attempts=send.max_attempts,
                retry_base=send.retry_delay,
                retry_cap=send.max_delay,
                source=f"campaign {self.cid}",
            )

    def _release(self, targets: list[Any]) -> None:
        with open_session(self.url) as session:
            ledger.release(session, self.token, [t.delivery_id for t in targets])

    def _progress(self, done: int) -> None:
        if self.outer is None or self.stopped_by is not None:
            return
        try:
            self.outer(done, max(done, self.total))
        except runner.JobReleased as exc:  # the worker is giving the job back: stop, then re-raise
            self.stopped_by = exc
        except KeyboardInterrupt:
            pass  # a signal in `--wait`: self.signal() says which

    def _should_stop(self) -> bool:
        if self.signal() or self.stopped_by is not None:
            return True
        with open_session(self.url, write=False) as session:
            campaign = session.get(Campaign, self.cid)
            return campaign is None or campaign.status != CampaignStatus.SENDING

    # -- between rounds

    def _finish_or_wait(self) -> float | None:
        """Nothing due: skip the pending deliveries no longer mailable; sent when none is left, else the seconds
        until the next is due (0: one is due now)."""
        with open_session(self.url) as session:
            ledger.sweep(session, self.cid)
            pending, when = ledger.next_due(session, self.cid)
            campaign = get_campaign(session, self.cid)
            if campaign.status != CampaignStatus.SENDING:
                return None
            if pending == 0:
                _set(campaign, CampaignStatus.SENT, None)
                session.add(campaign)
                return None
        return 0.0 if when is None else max(0.0, (when - utcnow()).total_seconds())

    def _sleep(self, seconds: float) -> bool:
        """Wait for the next retry; True if stopped meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._should_stop():
                return True
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        return False

    def _queue_later(self, seconds: float) -> None:
        """A retry due later than WAIT_IN_RUN: a new job for then, so no worker idles on it."""
        from campaign_manager.jobs.queue import enqueue_job

        with open_session(self.url) as session:
            job = create_job(session, KIND, {"campaign_id": self.cid})
            session.flush()
            enqueue_job(self.settings, int(job.id or 0), eta=utcnow() + timedelta(seconds=seconds))

    def _pause(self, reason: str) -> None:
        with open_session(self.url) as session:
            campaign = get_campaign(session, self.cid)
            if campaign.status == CampaignStatus.SENDING:
                _set(campaign, CampaignStatus.PAUSED, reason)
                session.add(campaign)


# ------------------------------------------------------------------------------------ pause, resume, cancel


def pause(session: Session, ref: str | int) -> Campaign:
    campaign = get_campaign(session, ref)
    if campaign.status not in (CampaignStatus.SCHEDULED, CampaignStatus.SENDING):
        raise Conflict(f"campaign {campaign.id} is {campaign.status}; only a scheduled or sending one can be paused")
    _set(campaign, CampaignStatus.PAUSED, "paused by `cm campaign pause`")
    session.add(campaign)
    return campaign


def resume(session: Session, ref: str | int) -> tuple[Campaign, Job]:
    """paused -> sending (or scheduled, if it never started), with a new job; the caller enqueues it."""
    campaign = get_campaign(session, ref)
    if campaign.status != CampaignStatus.PAUSED:
        raise Conflict(f"campaign {campaign.id} is {campaign.status}, not paused")
    status = CampaignStatus.SENDING if campaign.started_at is not None else CampaignStatus.SCHEDULED
    if status == CampaignStatus.SCHEDULED:
        campaign.scheduled_at = utcnow()  # resumed now: no longer late
    _set(campaign, status, None)
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
        _set(campaign, CampaignStatus.CANCELLED, "cancelled by `cm campaign cancel`")
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
                _set(campaign, CampaignStatus.SENDING, None)
                campaign.finished_at = None
                session.add(campaign)
    return cid, again
