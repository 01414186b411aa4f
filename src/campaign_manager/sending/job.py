"""The send job: write a campaign's ledger (or go on writing it), then send what is pending through its notifier
with `engine`, until nothing is due, a pause, a signal or an outage past `send.max_outage`. Safe to run again at any
point: the ledger says what is done."""

from __future__ import annotations

import logging
import secrets
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from campaign_manager.db import open_session
from campaign_manager.jobs import runner
from campaign_manager.jobs.records import Progress, create_job, get_job
from campaign_manager.notifiers import Message, Need, Result, needs
from campaign_manager.sending import engine, ledger
from campaign_manager.sending.campaigns import get_campaign
from campaign_manager.sending.service import KIND, make_renderer, resolve_notifier, set_status
from campaign_manager.states import CampaignStatus
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.sending import Campaign

if TYPE_CHECKING:
    from campaign_manager.config import Settings
    from campaign_manager.sending.render import Target

log = logging.getLogger("campaign_manager.send")
# A retry due within this long is waited for in the same run; a later one is a new job, queued for then.
WAIT_IN_RUN = 120.0


def run_send_job(url: str, job_id: int, progress: Progress | None = None) -> dict[str, Any]:
    """The job handler: write the campaign's ledger (or go on writing it), then send what is pending."""
    settings = runner.current_settings()
    if settings is None:
        from campaign_manager.config import load_settings

        settings = load_settings(None)
    with open_session(url, write=False) as session:
        cid = int(get_job(session, job_id).args["campaign_id"])
    if not _start(url, settings, cid) or not _write_ledger(url, cid):
        return {"campaign_id": cid, "skipped": 1}
    return Send(url, settings, cid, progress).run()


def _start(url: str, settings: Settings, cid: int) -> bool:
    """A scheduled send starts (or is paused `late`); whether there is anything to do."""
    with open_session(url) as session:
        campaign = get_campaign(session, cid)
        if campaign.status == CampaignStatus.SCHEDULED and campaign.started_at is None:
            late = campaign.scheduled_at is not None and utcnow() - campaign.scheduled_at > timedelta(
                seconds=settings.send.max_delay
            )
            if late:
                set_status(campaign, CampaignStatus.PAUSED, "late")
                session.add(campaign)
                log.warning("campaign %d: its scheduled start has passed by more than send.max_delay: paused", cid)
                return False
            campaign.started_at = utcnow()
            session.add(campaign)
        return campaign.status in (CampaignStatus.SCHEDULED, CampaignStatus.SENDING)


def _write_ledger(url: str, cid: int) -> bool:
    """The ledger, a segment of recipient ids per transaction, going on after the last one committed; the campaign
    is `sending` once it is complete. False if the campaign was paused or cancelled meanwhile."""
    while True:
        with open_session(url) as session:
            campaign = get_campaign(session, cid)
            if campaign.status not in (CampaignStatus.SCHEDULED, CampaignStatus.SENDING):
                return False
            if campaign.ledger_done:
                if campaign.status == CampaignStatus.SCHEDULED:
                    set_status(campaign, CampaignStatus.SENDING, None)
                    session.add(campaign)
                return True
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
        self.first_claim: float | None = None  # when the sending phase began (for `stats` and the benchmark)
        self.signal = runner.defer_interrupts()

    def run(self) -> dict[str, Any]:
        from campaign_manager.sending.render import RenderError

        self.render_error = RenderError
        send = self.settings.send
        with open_session(self.url, kept=True) as session:
            campaign = get_campaign(session, self.cid)
            name, cls = resolve_notifier(self.settings, campaign.notifier)
            self.need = needs(cls)
            self.renderer = make_renderer(session, self.settings, campaign, need=self.need)
            self.total = sum(v for k, v in ledger.counts(session, self.cid).items() if k != "skipped")
        config = self.settings.notifiers[name]
        limits = [r for r in (getattr(config, "rate", 0) or 0, campaign.rate or 0) if r > 0]
        sender = engine.Sender(
            cls(config),
            engine.Hooks(self._claim, self._render, self._record, self._release, self._progress),
            rate=min(limits) if limits else 0.0,
            record_batch=send.record_batch,
            record_interval=send.record_interval,
            max_outage=send.max_outage,
        )
        try:
            self._rounds(sender)
        finally:
            sender.close()
        signum = self.signal()
        if signum:
            import signal as signals

            self._pause(f"interrupted by {signals.Signals(signum).name}")
        if self.stopped_by is not None:
            raise self.stopped_by  # the worker gave the job back: another run goes on from the ledger
        with open_session(self.url, write=False, kept=True) as session:
            counts = ledger.counts(session, self.cid)
        seconds = 0.0 if self.first_claim is None else time.monotonic() - self.first_claim
        return {"campaign_id": self.cid, **counts, "interrupted": signum, "sending_seconds": round(seconds, 3)}

    def _rounds(self, sender: engine.Sender) -> None:
        """Send until nothing is pending (or a retry is due later than WAIT_IN_RUN), a pause, a signal or an
        outage past send.max_outage."""
        while True:
            ended = engine.run(sender, poll=self._should_stop)
            if ended == "down":
                self._pause(f"the notifier was down for more than send.max_outage: {sender.totals.down}")
                return
            if ended == "stopped" or self.stopped_by is not None or self.signal():
                return
            wait = self._finish_or_wait()
            if wait is None:
                return
            if wait > WAIT_IN_RUN:
                self._queue_later(wait)
                return
            if self._sleep(wait):
                return
            sender.stopping = False

    # -- hooks (each runs in a thread)

    def _claim(self) -> list[Any] | None:
        if self.first_claim is None:
            self.first_claim = time.monotonic()
        with open_session(self.url, kept=True) as session:
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
        if self.need == Need.PHONE and not target.phone:
            return Result.skipped("no phone")
        try:
            # The ledger's target has the renderer's fields (and `attempts`): passed as it is, no copy a message.
            return self.renderer.render(cast("Target", target))
        except self.render_error as exc:
            return Result.failed(exc.reason)

    def _record(self, items: list[tuple[Any, Result]]) -> None:
        send = self.settings.send
        with open_session(self.url, kept=True) as session:
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
        with open_session(self.url, kept=True) as session:
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
        with open_session(self.url, write=False, kept=True) as session:
            campaign = session.get(Campaign, self.cid)
            return campaign is None or campaign.status != CampaignStatus.SENDING

    # -- between rounds

    def _finish_or_wait(self) -> float | None:
        """Nothing due: skip the pending deliveries no longer mailable; sent when none is left, else the seconds
        until the next is due (0: one is due now)."""
        with open_session(self.url, kept=True) as session:
            ledger.sweep(session, self.cid)
            pending, when = ledger.next_due(session, self.cid)
            campaign = get_campaign(session, self.cid)
            if campaign.status != CampaignStatus.SENDING:
                return None
            if pending == 0:
                set_status(campaign, CampaignStatus.SENT, None)
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

        with open_session(self.url, kept=True) as session:
            job = create_job(session, KIND, {"campaign_id": self.cid})
            session.flush()
            enqueue_job(self.settings, int(job.id or 0), eta=utcnow() + timedelta(seconds=seconds))

    def _pause(self, reason: str) -> None:
        with open_session(self.url, kept=True) as session:
            campaign = get_campaign(session, self.cid)
            if campaign.status == CampaignStatus.SENDING:
                set_status(campaign, CampaignStatus.PAUSED, reason)
                session.add(campaign)
