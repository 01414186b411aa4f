"""Opting out by a message's token, and undoing it: the rules `cm serve`'s pages (`/u/{token}`, `/undo/{token}`)
and `cm recipient opt-out --token` (for whoever reads the List-Unsubscribe mailto: box) share.

- An unsubscribe token never expires and stays usable: using it again changes nothing more. A `test` token (the
  links of a `--test-to` copy) is read alike and changes nothing. A token whose person was forgotten since finds
  nobody: nothing to do.
- An undo token is made only by the opt-out it undoes (its ref id is that consent event's id), works for an hour,
  and only while that opt-out is still the person's latest consent event: an opt-out by the operator, or one
  undone already, cannot be undone from the web.
- The recipient's row is locked (PostgreSQL) while its status is read and changed, so that a mail provider's
  retries arriving together record one event, not two. SQLite writes one transaction at a time anyway.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

from sqlmodel import Session

from campaign_manager.audience import consent
from campaign_manager.sending.ledger import identity, signing_secrets
from campaign_manager.sending.tokens import BadToken, Purpose, Token, make_token, read_token
from campaign_manager.states import ConsentAction
from campaign_manager.tables.audience import Recipient

if TYPE_CHECKING:
    from campaign_manager.config import Settings

UNDO_MAX_AGE = timedelta(hours=1)
_LINK_PURPOSES = frozenset({Purpose.UNSUBSCRIBE, Purpose.TEST})


class Visit(NamedTuple):
    """Whom an unsubscribe link is about, read without changing anything (the page a GET shows)."""

    test: bool  # a `--test-to` copy's link: its pages change nothing
    recipient: Recipient | None  # None: forgotten since


class Unsubscribed(NamedTuple):
    """What using an unsubscribe link did."""

    test: bool
    recipient: Recipient | None  # None: forgotten since (nothing to do)
    changed: bool  # this use opted the person out (False: a test token, or they were out already)
    undo_token: str | None  # set only when `changed`: the token of the link that undoes this opt-out


def visit(session: Session, settings: Settings, token: str) -> Visit:
    """The person an unsubscribe (or test) token names; changes nothing. BadToken for a bad, tampered or foreign
    token, or one of another purpose."""
    found = _read(session, settings, token, _LINK_PURPOSES)
    return Visit(found.purpose is Purpose.TEST, session.get(Recipient, found.recipient_id))


def unsubscribe(
    session: Session, settings: Settings, token: str, *, source: str, client_ip: str | None = None
) -> Unsubscribed:
    """Opt out the person an unsubscribe token names (a consent event with `source` and the client's address).
    A test token, a person forgotten since or one already out: nothing changes. BadToken as `visit`."""
    found = _read(session, settings, token, _LINK_PURPOSES)
    test = found.purpose is Purpose.TEST
    recipient = session.get(Recipient, found.recipient_id, with_for_update=not test)
    if test or recipient is None:
        return Unsubscribed(test, recipient, False, None)
    recipient, changed = consent.opt_out(
        session, recipient, reason=f"campaign {found.ref_id}", source=source, client_ip=client_ip
    )
    undo_token = None
    if changed:
        session.flush()
        event = consent.latest_event(session, recipient)
        assert event is not None and event.id is not None  # the opt-out just recorded
        secret = signing_secrets(settings, identity(session)[1])[0]
        undo_token = make_token(secret, Purpose.UNDO, found.recipient_id, event.id)
    return Unsubscribed(False, recipient, changed, undo_token)


def undo(
    session: Session, settings: Settings, token: str, *, client_ip: str | None = None, now: datetime | None = None
) -> Recipient | None:
    """Re-subscribe the person an undo token names (an opt-in, source `web-undo`, with the client's address). None
    when they were forgotten since. BadToken for a bad token, one older than an hour, or one whose opt-out is no
    longer the person's latest consent event (undone already, or something happened since)."""
    recipient = undoable(session, settings, token, now=now, lock=True)
    if recipient is not None:
        consent.opt_in(session, recipient, reason=None, source="web-undo", client_ip=client_ip)
    return recipient


def undoable(
    session: Session, settings: Settings, token: str, *, now: datetime | None = None, lock: bool = False
) -> Recipient | None:
    """The person an undo token would re-subscribe, changing nothing (`undo`'s checks; a GET of the undo link shows
    its button again). None when they were forgotten since; BadToken as `undo` says."""
    found = _read(session, settings, token, Purpose.UNDO, max_age=UNDO_MAX_AGE, now=now)
    recipient = session.get(Recipient, found.recipient_id, with_for_update=lock)
    if recipient is None:
        return None
    latest = consent.latest_event(session, recipient)
    if latest is None or latest.id != found.ref_id or latest.action != ConsentAction.OPT_OUT:
        raise BadToken("the undo link no longer applies (the opt-out it undoes is not the latest change)")
    return recipient


def opt_out_by_token(
    session: Session, settings: Settings, token: str, *, reason: str | None = None
) -> tuple[Recipient, bool] | None:
    """`cm recipient opt-out --token`: opt out the person an unsubscribe token names (source `unsubscribe token`).
    None for a test token (it changes nothing) or a person forgotten since; BadToken (exit 2) for a bad, tampered
    or foreign one."""
    found = _read(session, settings, token.strip(), _LINK_PURPOSES)
    if found.purpose is Purpose.TEST:
        return None
    recipient = session.get(Recipient, found.recipient_id, with_for_update=True)
    if recipient is None:
        return None
    return consent.opt_out(session, recipient, reason=reason, source="unsubscribe token")


def _read(
    session: Session,
    settings: Settings,
    token: str,
    purposes: Purpose | frozenset[Purpose],
    *,
    max_age: timedelta | None = None,
    now: datetime | None = None,
) -> Token:
    return read_token(token, purposes, signing_secrets(settings, identity(session)[1]), max_age=max_age, now=now)
