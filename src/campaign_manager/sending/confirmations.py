"""The confirmation of a sign-up (double opt-in): taking the form's sign-up and queueing its confirmation as a job
(`submit_signup`: no message is sent inside the request, so the answer takes the same time whatever the address),
the job that sends it (`run_confirm_job`, kind "confirm", through `send.notifier`), and the link in it, a signed
token of purpose `confirm` that works for `serve.confirm_days` (`open_link`).

The message is made from templates the operator may replace (`serve.templates`): `confirm_email_subject.txt` and
`confirm_email.txt`, which get `confirm_url`, `group` (the list's name, or None), `days` and `sender`. They do not get
the name the form was given: anyone can type anyone's address into a form, and its name field would otherwise
carry their text into a stranger's inbox.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from email.utils import format_datetime, parseaddr
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from campaign_manager import db
from campaign_manager.audience import signups
from campaign_manager.config import load_settings
from campaign_manager.errors import CmError, ConfigError
from campaign_manager.jobs import queue, records, runner
from campaign_manager.jobs.records import Progress
from campaign_manager.notifiers import Message, Outcome
from campaign_manager.sending import mime
from campaign_manager.sending.ledger import identity, signing_secrets
from campaign_manager.sending.samples import send_one
from campaign_manager.sending.service import resolve_notifier
from campaign_manager.sending.tokens import BadToken, Purpose, make_token, read_token
from campaign_manager.serve.views import Views
from campaign_manager.states import RecipientStatus
from campaign_manager.tables.audience import Recipient, Signup
from campaign_manager.tables.base import utcnow

if TYPE_CHECKING:
    from campaign_manager.config import Settings

JOB_KIND = "confirm"
SUBJECT_TEMPLATE, TEXT_TEMPLATE = "confirm_email_subject.txt", "confirm_email.txt"


class NotSentYet(Exception):
    """The notifier could not send the confirmation now (a retry): the job is retried as jobs are."""


def missing_setting(settings: Settings) -> str | None:
    """What keeps double opt-in from working (None: nothing): a confirmation needs `serve.base_url` for its link,
    `send.from` and a `send.notifier`."""
    if not settings.serve.base_url:
        return "serve.base_url is not set (the confirmation link is built on it)"
    if "@" not in parseaddr(settings.send.from_)[1]:
        return "send.from is not set (the confirmation's From)"
    try:
        resolve_notifier(settings, None)
    except ConfigError as exc:
        return exc.message
    return None


def submit_signup(settings: Settings, form: signups.Form, *, client_ip: str | None) -> signups.Outcome:
    """Purge a batch of expired sign-ups, record this one (`signups.sign_up`) and, when a confirmation is to go,
    queue its job, all in one transaction: the job's message goes on the queue before the commit (as
    `queue.submit_job` does), so a failure leaves nothing behind."""
    serve = settings.serve
    with db.settings_session(settings) as session:
        _, own = identity(session)
        signups.purge_expired(session, days=serve.confirm_days)
        outcome = signups.sign_up(
            session,
            form,
            double_opt_in=serve.double_opt_in,
            rate=serve.subscribe_rate,
            client=signups.client_key(own, client_ip),
            client_ip=client_ip,
        )
        if outcome.confirm is not None:
            job = records.create_job(session, JOB_KIND, {"signup_id": outcome.confirm})
            queue.enqueue_job(settings, int(job.id or 0))
    return outcome


def open_link(session: Session, settings: Settings, token: str) -> tuple[Signup, Recipient]:
    """The sign-up and recipient a confirmation link names; BadToken when the link is malformed, altered, older
    than `serve.confirm_days`, or its sign-up is gone (purged, or the person forgotten)."""
    _, own = identity(session)
    found = read_token(
        token,
        Purpose.CONFIRM,
        signing_secrets(settings, own),
        max_age=timedelta(days=settings.serve.confirm_days),
    )
    opened = signups.find_signup(session, found.recipient_id, found.ref_id)
    if opened is None:
        raise BadToken("the sign-up this link confirms is gone (it expired, or the address was erased)")
    return opened


def run_confirm_job(url: str, job_id: int, progress: Progress | None = None) -> dict[str, Any]:
    """The job handler: mail a sign-up its confirmation. Nothing goes when the sign-up is gone or confirmed, or
    the address bounced meanwhile. A notifier's retry raises NotSentYet (the job is retried); its refusal fails
    the job (CmError), with the reason recorded and the address left out of it."""
    settings = runner.current_settings()
    if settings is None:  # the handler called directly: the settings of this process, over `url`
        settings = load_settings(None, {"database.url": url})
    with db.open_session(url) as session:
        signup_id = int(records.get_job(session, job_id).args["signup_id"])
        found = session.get(Signup, signup_id)
        recipient = None if found is None else session.get(Recipient, found.recipient_id)
        if found is None or recipient is None or found.confirmed_at is not None:
            return {"sent": 0, "skipped": 1}
        if recipient.status == RecipientStatus.BOUNCED:
            return {"sent": 0, "skipped": 1}
        message = _message(session, settings, found, recipient)
    name, cls = resolve_notifier(settings, None)
    result = asyncio.run(send_one(cls(settings.notifiers[name]), message))
    if result.outcome == Outcome.SENT:
        return {"sent": 1}
    reason = " ".join(result.reason.replace(message.to, "<recipient>").split()) or "no reason given"
    if result.outcome == Outcome.RETRY:
        raise NotSentYet(f"the confirmation was not sent yet: {reason}")
    raise CmError(f"the confirmation could not be sent: {reason}")


def _message(session: Session, settings: Settings, signup: Signup, recipient: Recipient) -> Message:
    database_id, own = identity(session)
    token = make_token(signing_secrets(settings, own)[0], Purpose.CONFIRM, int(recipient.id or 0), int(signup.id or 0))
    views = Views(settings)
    values = {
        "confirm_url": f"{settings.serve.base_url}/confirm/{token}",
        "group": signups.group_name(session, signup),
        "days": settings.serve.confirm_days,
    }
    subject = " ".join(views.render(SUBJECT_TEMPLATE, **values).split())
    text = mime.normalize_newlines(views.render(TEXT_TEMPLATE, **values))
    sender = settings.send.from_
    if mime.LINE_BREAKS.search(sender):
        raise ConfigError("send.from holds a line break")
    name, address = parseaddr(sender)
    key = f"{database_id}-confirm-{signup.id}"
    domain = mime.ascii_address(address).rpartition("@")[2]
    message_id = f"<{key}@{domain}>"
    head = (
        f"Date: {format_datetime(utcnow())}\r\n"
        f"From: {mime.mailbox(name, address)}\r\n"
        f"To: {mime.ascii_address(recipient.email)}\r\n"
        f"{mime.unstructured('Subject', subject)}\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Auto-Submitted: auto-generated\r\n"
    )
    data = head.encode("utf-8") + mime.body_part("plain", text)
    return Message(
        key=key,
        to=recipient.email,
        sender=sender,
        envelope_from=address,
        subject=subject,
        text=text,
        data=data,
        message_id=message_id,
        headers=(("Auto-Submitted", "auto-generated"),),
    )
