"""Sign-ups on `cm serve`'s form: who may sign up and what a sign-up records, its confirmation (double opt-in), and
the purge of the sign-ups nobody confirmed. The confirmation message and its job are `sending.confirmations`'.

What the form does is the same answer for every address, so that the form tells nobody who is on the list:
- a new address becomes a `pending` recipient with a sign-up (the name and public group the form asked for, kept
  apart until confirmed), and a confirmation is mailed; a known one (active, opted out, pending) gets a sign-up and
  a confirmation too, and nothing of the recipient changes until the person confirms; a forgotten or bounced
  address gets nothing, and nothing is stored about it;
- at most one confirmation goes to an address per CONFIRM_EVERY, and a client (by IP address) makes at most
  `serve.subscribe_rate` sign-ups per RATE_WINDOW. The client's address is kept only as a keyed hash (`client_key`),
  on the sign-up, and goes with it.
With `serve.double_opt_in` off, the form's consent counts at once: a new (or pending) address becomes active, with
the client's IP address on its consent event; nobody else changes.

Sign-ups (confirmed or not) are deleted `serve.confirm_days` after they were made, and so are the pending recipients
left with none (`purge_expired`: bounded work a call, run on each sign-up and by the workers' hourly housekeeping).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from campaign_manager import limits
from campaign_manager.audience import consent
from campaign_manager.audience.address_keys import email_key
from campaign_manager.audience.addresses import check_email
from campaign_manager.audience.groups import find_group
from campaign_manager.states import RecipientStatus
from campaign_manager.tables.audience import Group, GroupMember, Recipient, Signup
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.sending import CampaignRecipient

CONFIRM_EVERY = timedelta(hours=24)  # at most one confirmation message to an address in this time
RATE_WINDOW = timedelta(hours=1)  # serve.subscribe_rate counts the sign-ups of a client in this time
PURGE_BATCH = 200  # sign-ups a purge looks at in one go (each sign-up purges one batch at most)


class Form(NamedTuple):
    """What the sign-up form sent: `trap` is the hidden field only robots fill in (a honeypot)."""

    email: str
    name: str = ""
    group: str = ""
    trap: str = ""


class Answer(StrEnum):
    ACCEPTED = "accepted"  # the same answer whatever became of the address
    INVALID = "invalid"  # the form must be fixed (`problem` says what); nothing was recorded
    RATE_LIMITED = "rate_limited"  # this client signed up too often lately; nothing was recorded


class Outcome(NamedTuple):
    answer: Answer
    problem: str | None = None
    confirm: int | None = None  # the sign-up to mail a confirmation for (double opt-in), if one is to go


def client_key(secret: bytes, client_ip: str | None) -> str:
    """The keyed hash a sign-up keeps of the client's IP address, to count a client's sign-ups: without the secret
    (the database's own, from `sending.ledger.identity`) it cannot be turned back into the address."""
    return hmac.new(secret, b"signup-client:" + (client_ip or "unknown").encode(), hashlib.sha256).hexdigest()


def public_groups(session: Session) -> list[dict[str, Any]]:
    """The groups the form offers (`cm group update G --public`), by name."""
    groups = session.exec(select(Group).where(col(Group.public).is_(True)).order_by(col(Group.name))).all()
    return [{"id": g.id, "name": g.name, "description": g.description} for g in groups]


def sign_up(
    session: Session,
    form: Form,
    *,
    double_opt_in: bool,
    rate: int,
    client: str,
    client_ip: str | None,
    now: datetime | None = None,
) -> Outcome:
    """Record what the form asked for (see the module's docstring). `client` is the client's `client_key`,
    `client_ip` its address (kept only on the consent event of a sign-up made active at once), `rate` the
    sign-ups a client may make per RATE_WINDOW (0: no limit). The caller mails `Outcome.confirm`'s sign-up."""
    if form.trap:
        return Outcome(Answer.ACCEPTED)
    normalized, reason = check_email(form.email)
    if reason is not None:
        return Outcome(Answer.INVALID, f"that is not an email address: {reason}")
    name = " ".join(form.name.split()) or None
    if name is not None and len(name) > limits.NAME:
        return Outcome(Answer.INVALID, f"the name is too long (at most {limits.NAME} characters)")
    group = _offered(session, form.group)
    if form.group and group is None:
        return Outcome(Answer.INVALID, "choose one of the lists offered")
    now = now or utcnow()
    if rate > 0 and _recent_signups(session, client, now) >= rate:
        return Outcome(Answer.RATE_LIMITED)
    key = email_key(normalized)
    # Locked (PostgreSQL) so that two sign-ups of one address at the same time mail it once; SQLite's write lock,
    # which every write session takes at once, does the same there.
    recipient = session.exec(select(Recipient).where(Recipient.email_key == key).with_for_update()).first()
    if recipient is None:
        if consent.is_forgotten(session, key):
            return Outcome(Answer.ACCEPTED)
        recipient = _new_pending(session, normalized, key)
        if recipient is None:
            return Outcome(Answer.ACCEPTED)  # the same address signed up at this very moment: that one is mailed
    elif recipient.status == RecipientStatus.BOUNCED or _mailed_lately(session, recipient, now):
        return Outcome(Answer.ACCEPTED)
    signup = Signup(recipient_id=int(recipient.id or 0), group_id=group, name=name, client_key=client, created_at=now)
    session.add(signup)
    session.flush()
    if double_opt_in:
        return Outcome(Answer.ACCEPTED, confirm=signup.id)
    if consent.sign_up(session, recipient, confirmed=False, client_ip=client_ip):
        _apply(session, signup, recipient, now)
    return Outcome(Answer.ACCEPTED)


def _offered(session: Session, ref: str) -> int | None:
    """The id of the public group the form names (by id, as cm's form sends it, or by name), or None."""
    group = find_group(session, ref) if ref.strip() else None
    return group.id if group is not None and group.public else None


def _recent_signups(session: Session, client: str, now: datetime) -> int:
    query = select(sa.func.count()).where(Signup.client_key == client, col(Signup.created_at) > now - RATE_WINDOW)
    return int(session.exec(query).one())


def _mailed_lately(session: Session, recipient: Recipient, now: datetime) -> bool:
    """Whether the address had a sign-up (so a confirmation) within CONFIRM_EVERY."""
    query = select(Signup.id).where(Signup.recipient_id == recipient.id, col(Signup.created_at) > now - CONFIRM_EVERY)
    return session.exec(query.limit(1)).first() is not None


def _new_pending(session: Session, normalized: str, key: str) -> Recipient | None:
    """A new pending recipient, or None when another request created the address meanwhile (PostgreSQL)."""
    recipient = consent.new_recipient(normalized, key, pending=True)
    try:
        with session.begin_nested():
            session.add(recipient)
            session.flush()
    except IntegrityError:
        return None
    return recipient


def find_signup(session: Session, recipient_id: int, signup_id: int) -> tuple[Signup, Recipient] | None:
    """The sign-up a confirmation link names, with its recipient; None when it is gone (purged, or the person was
    forgotten) or the link's ids do not match."""
    signup = session.get(Signup, signup_id)
    if signup is None or signup.recipient_id != recipient_id:
        return None
    recipient = session.get(Recipient, recipient_id)
    return None if recipient is None else (signup, recipient)


def confirm(
    session: Session, signup: Signup, recipient: Recipient, *, client_ip: str | None, now: datetime | None = None
) -> bool:
    """The person confirmed their sign-up: they become active (`consent.sign_up`: a pending or opted-out recipient;
    the consent event keeps `client_ip`), and get the name and the public group the form asked for.
    Returns False when the sign-up was confirmed already: a link works once, so that an old one cannot undo a
    later opt-out."""
    if signup.confirmed_at is not None:
        return False
    now = now or utcnow()
    consent.sign_up(session, recipient, confirmed=True, client_ip=client_ip)
    if recipient.status == RecipientStatus.ACTIVE:
        _apply(session, signup, recipient, now)
    signup.confirmed_at = now
    session.flush()
    return True


def _apply(session: Session, signup: Signup, recipient: Recipient, now: datetime) -> None:
    """What the form asked for, now that it counts: its name, and its group while that is still public."""
    signup.confirmed_at = now
    if signup.name:
        recipient.name = signup.name
    recipient.updated_at = now
    group = None if signup.group_id is None else session.get(Group, signup.group_id)
    if group is not None and group.public and session.get(GroupMember, (group.id, recipient.id)) is None:
        session.add(GroupMember(group_id=group.id, recipient_id=recipient.id))
    session.flush()


def group_name(session: Session, signup: Signup) -> str | None:
    group = None if signup.group_id is None else session.get(Group, signup.group_id)
    return None if group is None else group.name


def purge_expired(session: Session, *, days: float, now: datetime | None = None, batch: int = PURGE_BATCH) -> bool:
    """Delete the oldest sign-ups made more than `days` ago, at most `batch` of them, and the pending recipients
    they leave with none. Only the first `batch` sign-ups (by id, which is their order in time) are looked at, so
    a call costs the same however many there are. Returns whether there may be more to delete."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    head = session.exec(
        select(Signup.id, Signup.recipient_id, Signup.created_at).order_by(col(Signup.id)).limit(batch)
    ).all()
    expired = [(sid, rid) for sid, rid, created in head if created < cutoff]
    if not expired:
        return False
    session.exec(sa.delete(Signup).where(col(Signup.id).in_([sid for sid, _ in expired])))
    _drop_unconfirmed(session, sorted({rid for _, rid in expired}))
    return len(expired) == batch


def _drop_unconfirmed(session: Session, recipient_ids: list[int]) -> None:
    """Delete those of these recipients (a purge's batch) that are still pending and have no sign-up left: nobody
    confirmed them, and nothing of them stays (they have no consent event: nobody consented)."""
    doomed = list(
        session.exec(
            select(Recipient.id).where(
                col(Recipient.id).in_(recipient_ids),
                col(Recipient.status) == RecipientStatus.PENDING,
                ~sa.exists().where(col(Signup.recipient_id) == Recipient.id),
            )
        ).all()
    )
    if doomed:
        for table in (GroupMember, CampaignRecipient):
            session.exec(sa.delete(table).where(col(table.recipient_id).in_(doomed)))
        session.exec(sa.delete(Recipient).where(col(Recipient.id).in_(doomed)))


def signups_of(session: Session, recipient_id: int) -> list[dict[str, Any]]:
    """A person's sign-ups, for `cm recipient export` (the client's address is only a keyed hash)."""
    rows = session.exec(select(Signup).where(Signup.recipient_id == recipient_id).order_by(col(Signup.id))).all()
    return [
        {
            "created_at": s.created_at,
            "confirmed_at": s.confirmed_at,
            "name": s.name,
            "group": group_name(session, s),
            "client_key": s.client_key,
        }
        for s in rows
    ]
