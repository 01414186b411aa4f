"""The consent rules, in one place: every path that creates, adds, reactivates or mails recipients asks here.

- An address may be added (created if new, put in a group or a campaign's audience) only while it is neither
  forgotten nor held by a recipient who is not active (`may_add`; in SQL `sql_may_add`). An opted-out person stays
  opted out: imports, creates and updates never reactivate anyone. Only the paths in REACTIVATION_PATHS do, and of
  those only UNFORGET_PATHS bring back a forgotten address.
- A `pending` recipient signed up on `cm serve`'s form and has not confirmed yet: never mailed, never in an
  audience or an active count. Their confirmation makes them active (`sign_up`, which also reactivates an opted-out
  person: their own new consent); so does an operator's create, add or import of the address (`admit`, in SQL
  `SQL_ADMIT`), with a consent event saying so.
- Only an active recipient is mailed (`mailable`, `may_mail`). A hard bounce (`bounce`) makes a recipient
  `bounced`: never mailed again until an operator clears it (`clear_bounce`, `cm recipient update --clear-bounce`).
  A campaign's ledger says why each recipient it skips is skipped (`skip_reason`, `sql_skip_reason`).
- A forgotten person is erased; only the SHA-256 of their email key is kept, in `suppression`, and an address
  with that hash can never be created, imported or mailed again. No other module reads or writes `suppression`,
  and no other module writes a recipient's status: new recipients are made by `new_recipient`.
- Every opt-out, opt-in and erasure is appended to `consent_event` with its time, reason and source (and the
  client's IP address when the person acted on `cm serve`'s pages; `forget` clears it with the reasons, and deletes
  the person's sign-ups, which hold a keyed hash of it).

tests/test_consent_paths.py gives every write path an opted-out and a forgotten address, checks that no module
but this one writes a status or reads `suppression`, and that `sql_may_add` and `may_add` agree.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy import ColumnElement, inspect
from sqlmodel import Session, col, delete, select, update

from campaign_manager import limits
from campaign_manager.audience.address_keys import Address
from campaign_manager.audience.address_keys import email_hash as email_hash  # the hash a forgotten address leaves
from campaign_manager.errors import ConsentError
from campaign_manager.states import ConsentAction, RecipientStatus
from campaign_manager.tables.audience import ConsentEvent, GroupMember, Recipient, Signup, Suppression
from campaign_manager.tables.base import utcnow

log = logging.getLogger(__name__)
# The campaigns that name a recipient (`tables.sending.CampaignRecipient`), as the one column `forget` needs: the
# table's class would load the campaigns' tables into every command that asks the consent rules.
_CAMPAIGN_LINKS = sa.table("campaign_recipient", sa.column("recipient_id"))

# The REST API's opt-in: `cm recipient opt-in` for a program holding the API token (the same service, source `api`).
API_OPT_IN = "POST /recipients/opt-in"
# The person's own confirmed sign-up (double opt-in on `cm serve`: `sign_up`): it makes an opted-out person active
# again (their new consent, given through the link mailed to the address), never a forgotten one.
CONFIRMED_SIGNUP = "cm serve sign-up confirmed"
# Every path allowed to make a person active again (an opted-out recipient active, a forgotten address addable);
# each calls `opt_in` or `opt_in_forgotten`: the operator's opt-in, the person's own signed undo on `cm serve`,
# their confirmed sign-up.
REACTIVATION_PATHS = ("cm recipient opt-in", API_OPT_IN, "cm serve undo (web-undo)", CONFIRMED_SIGNUP)
# The only paths that bring back a forgotten address (the person asked the operator): the others of
# REACTIVATION_PATHS reactivate an opted-out person only.
UNFORGET_PATHS = ("cm recipient opt-in", API_OPT_IN)
# The source of the consent a sign-up form gives at once, when `serve.double_opt_in` is off.
WEB_SIGNUP = "web-signup"

# Why an address may not be added (what `may_add` returns; `cm group add-recipients` shows it).
FORGOTTEN_REASON, OPTED_OUT_REASON, BOUNCED_REASON = "forgotten on request", "opted out", "bounced"
_ADDABLE, _PENDING = (RecipientStatus.ACTIVE, RecipientStatus.PENDING), (RecipientStatus.PENDING,)
PENDING_REASON = "not confirmed yet"  # why a pending recipient is not mailed (it may be added: see `admit`)
# The reason of the event that says an operator's create, add or import made a pending recipient active.
ADMITTED_REASON = "a pending sign-up, made active by the operator"


def may_add(status: str | None, *, forgotten: bool) -> str | None:
    """May an address be added (created if new, linked to a group or a campaign's audience)? `status` is its
    recipient's (None: there is none yet). None when it may; otherwise the reason it may not. Nothing here
    reactivates anyone: a recipient who is opted out or bounced stays out. A pending one may be added: the
    operator's add makes it active (`admit`)."""
    if forgotten:
        return FORGOTTEN_REASON
    if status is not None and status not in _ADDABLE:
        return skip_reason(status)
    return None


def skip_reason(status: str | None) -> str:
    """Why a recipient of this status (None: forgotten, the row is gone) is not mailed."""
    if status is None:
        return FORGOTTEN_REASON
    if status == RecipientStatus.PENDING:
        return PENDING_REASON
    return BOUNCED_REASON if status == RecipientStatus.BOUNCED else OPTED_OUT_REASON


def sql_skip_reason(status: str) -> str:
    """`skip_reason` in SQL, over an expression for the recipient's status (NULL when the row is gone)."""
    return (
        f"CASE WHEN {status} IS NULL THEN '{FORGOTTEN_REASON}' WHEN {status} = '{RecipientStatus.BOUNCED}'"
        f" THEN '{BOUNCED_REASON}' WHEN {status} = '{RecipientStatus.PENDING}' THEN '{PENDING_REASON}'"
        f" ELSE '{OPTED_OUT_REASON}' END"
    )


def may_mail(status: str) -> bool:
    """Only an active recipient is mailed (`mailable` is the same rule in SQL)."""
    return status == RecipientStatus.ACTIVE


def mailable() -> ColumnElement[bool]:
    """The SQL condition every audience query uses: only active recipients may be mailed. It names the table's
    column (which ORM queries take as well): a listing stays a query over tables, which costs no ORM set-up."""
    return inspect(Recipient).local_table.c.status == RecipientStatus.ACTIVE


def sql_mailable(status: str) -> str:
    """`may_mail` as a SQL condition over an expression for the recipient's status."""
    return f"{status} = '{RecipientStatus.ACTIVE}'"


def sql_may_add(status: str, gone: str) -> str:
    """`may_add` as a SQL condition, for set-based paths (imports; sending): `status` is an expression for the
    recipient's status (NULL when there is none yet, as from a LEFT JOIN), `gone` one that is 1 when the address
    is forgotten and 0 when not. A pending recipient may be added, and the path then admits it (SQL_ADMIT)."""
    addable = f"{status} IN ('{RecipientStatus.ACTIVE}', '{RecipientStatus.PENDING}')"
    return f"({gone} = 0 AND ({status} IS NULL OR {addable}))"


# The status a recipient made by a set-based path (an import) gets, as a SQL literal.
SQL_NEW_STATUS = f"'{RecipientStatus.ACTIVE}'"


def sql_is_pending(status: str) -> str:
    """A SQL condition: the status expression says pending (a set-based path counts these to admit them)."""
    return f"{status} = '{RecipientStatus.PENDING}'"


# `admit` for set-based paths (an import; pending rows are rare: count them with `sql_is_pending` first): the first
# statement makes a recipient active (params: the time, its id) and, when it did, the second records the consent
# event saying so (params: `admit_event_params`).
SQL_ADMIT = (
    f"UPDATE recipient SET status = '{RecipientStatus.ACTIVE}', updated_at = ?"
    f" WHERE id = ? AND status = '{RecipientStatus.PENDING}'",
    "INSERT INTO consent_event (recipient_id, email_hash, action, reason, source, client_ip, created_at)"
    " VALUES (?, ?, ?, ?, ?, NULL, ?)",
)


def admit_event_params(recipient_id: int, key: str, *, source: str, now: Any) -> tuple[Any, ...]:
    """The parameters of SQL_ADMIT's consent event for one recipient (by id, and its email key)."""
    action = ConsentAction.OPT_IN
    log.info("consent %s by %s", action, source, extra=_fields(action, recipient_id, source))
    return (recipient_id, email_hash(key), ConsentAction.OPT_IN, ADMITTED_REASON, source, now)


def sql_forgotten_since() -> str:
    """A query for the hashes of addresses forgotten since its one parameter (a time): imports ask it once a
    segment, for people forgotten while they run."""
    return "SELECT email_hash FROM suppression WHERE created_at >= ?"


def sql_hold_forgetting() -> str:
    """PostgreSQL: a statement that keeps any `forget` from committing until this transaction ends (a SHARE lock
    on `suppression`, which conflicts with the lock its insert takes): an import segment takes it before it
    writes recipients, so what it read of `suppression` stays true until it commits."""
    return "LOCK TABLE suppression IN SHARE MODE"


def new_recipient(
    email: str,
    key: str,
    *,
    name: str | None = None,
    phone: str | None = None,
    attributes: dict[str, Any] | None = None,
    pending: bool = False,
) -> Recipient:
    """A new, active recipient (not yet added to the session). The caller has asked `may_add` first. `pending`: a
    sign-up on `cm serve`'s form, waiting for its confirmation (`sign_up`)."""
    return Recipient(
        email=email,
        email_key=key,
        name=name,
        phone=phone,
        attributes=dict(attributes or {}),
        status=RecipientStatus.PENDING if pending else RecipientStatus.ACTIVE,
    )


def is_forgotten(session: Session, key: str) -> bool:
    return session.get(Suppression, email_hash(key)) is not None


def suppressed_hashes(session: Session) -> set[str]:
    """All erased addresses' hashes, for bulk imports to test rows against without a query per row."""
    return set(session.exec(select(Suppression.email_hash)).all())


def refuse_if_forgotten(session: Session, key: str) -> None:
    if is_forgotten(session, key):
        # The message does not repeat the address: it was erased, and this line may end up in a log.
        raise ConsentError(
            "that address was forgotten (erased on request) and cannot be added again",
            hint="only `cm recipient opt-in` by the person themselves lifts this",
        )


def _record(
    session: Session,
    *,
    key: str,
    recipient_id: int | None,
    action: ConsentAction,
    reason: str | None,
    source: str,
    client_ip: str | None = None,
) -> ConsentEvent:
    event = ConsentEvent(
        recipient_id=recipient_id,
        email_hash=email_hash(key),
        action=action,
        reason=reason,
        source=source,
        client_ip=client_ip,
    )
    session.add(event)
    # Ids only: a log line outlives `forget`, so it must not hold the address.
    log.info("consent %s by %s", action, source, extra=_fields(action, recipient_id, source))
    return event


def _fields(action: ConsentAction, recipient_id: int | None, source: str) -> dict[str, Any]:
    return {"fields": {"action": action, "recipient_id": recipient_id, "source": source}}


def opt_out(
    session: Session, who: Recipient | Address, *, reason: str | None, source: str, client_ip: str | None = None
) -> tuple[Recipient, bool]:
    """Opt a recipient, or an address (`addresses.parse_address`), out. An address no recipient holds is recorded as
    an opted-out recipient, so that a later create or import cannot mail it. Returns the recipient and whether
    anything changed. `client_ip`: the person's own address, when they opted out on `cm serve`'s page."""
    limits.check("the reason", reason, limits.REASON)
    if isinstance(who, Recipient):
        recipient: Recipient | None = who
        normalized, key = who.email, who.email_key
    else:
        normalized, key = who
        recipient = session.exec(select(Recipient).where(Recipient.email_key == key)).first()
    if recipient is None:
        if is_forgotten(session, key):
            raise ConsentError("that address was forgotten; it is already never mailed")
        recipient = Recipient(email=normalized, email_key=key, status=RecipientStatus.OPTED_OUT)
        session.add(recipient)
    elif recipient.status == RecipientStatus.OPTED_OUT:
        return recipient, False
    now = utcnow()
    recipient.status, recipient.opt_out_reason, recipient.opted_out_at = RecipientStatus.OPTED_OUT, reason, now
    recipient.updated_at = now
    session.flush()
    _record(
        session,
        key=key,
        recipient_id=recipient.id,
        action=ConsentAction.OPT_OUT,
        reason=reason,
        source=source,
        client_ip=client_ip,
    )
    return recipient, True


def _change(
    session: Session,
    recipient: Recipient,
    status: RecipientStatus,
    action: ConsentAction,
    *,
    reason: str | None,
    source: str,
    client_ip: str | None = None,
) -> None:
    """A recipient's new status, and the consent event saying why."""
    recipient.status, recipient.updated_at = status, utcnow()
    _record(
        session,
        key=recipient.email_key,
        recipient_id=recipient.id,
        action=action,
        reason=reason,
        source=source,
        client_ip=client_ip,
    )


def opt_in(
    session: Session, recipient: Recipient, *, reason: str | None, source: str, client_ip: str | None = None
) -> bool:
    """The only way back to `active`. Returns whether anything changed. `client_ip`: the person's own address,
    when they gave their consent on `cm serve`'s pages."""
    limits.check("the reason", reason, limits.REASON)
    if recipient.status == RecipientStatus.ACTIVE:
        return False
    recipient.opt_out_reason, recipient.opted_out_at = None, None
    _change(
        session,
        recipient,
        RecipientStatus.ACTIVE,
        ConsentAction.OPT_IN,
        reason=reason,
        source=source,
        client_ip=client_ip,
    )
    return True


def admit(session: Session, recipient: Recipient, *, source: str) -> bool:
    """An operator's create, group add or import of a pending address makes it active (the operator holds consent
    of their own for it), with a consent event saying so. Returns whether anything changed: only a pending
    recipient does (`may_add` keeps the opted-out and bounced ones out)."""
    return recipient.status == RecipientStatus.PENDING and opt_in(
        session, recipient, reason=ADMITTED_REASON, source=source
    )


def sign_up(session: Session, recipient: Recipient, *, confirmed: bool, client_ip: str | None) -> bool:
    """The person's own consent on `cm serve`'s form, with their IP address on the event. `confirmed`: they followed
    the link mailed to the address (double opt-in), and a pending or opted-out recipient becomes active
    (CONFIRMED_SIGNUP). Not confirmed (`serve.double_opt_in` off: WEB_SIGNUP): a pending one only, as an
    unverified form reactivates no one. A bounced one stays bounced. Returns whether anything changed."""
    if recipient.status not in ((RecipientStatus.PENDING, RecipientStatus.OPTED_OUT) if confirmed else _PENDING):
        return False
    source = CONFIRMED_SIGNUP if confirmed else WEB_SIGNUP
    return opt_in(session, recipient, reason=None, source=source, client_ip=client_ip)


def bounce(session: Session, recipient_id: int, *, reason: str, source: str) -> bool:
    """A hard bounce (the address does not exist): an active recipient becomes `bounced`, which no campaign mails
    until `clear_bounce`. Returns whether anything changed."""
    recipient = session.get(Recipient, recipient_id)
    if recipient is None or recipient.status != RecipientStatus.ACTIVE:
        return False
    _change(
        session, recipient, RecipientStatus.BOUNCED, ConsentAction.BOUNCE, reason=reason[: limits.REASON], source=source
    )
    return True


def clear_bounce(session: Session, recipient: Recipient, *, source: str) -> bool:
    """`cm recipient update --clear-bounce`: a bounced recipient is mailable again (the address was fixed, or the
    bounce was the server's mistake). Returns whether anything changed."""
    if recipient.status != RecipientStatus.BOUNCED:
        return False
    _change(session, recipient, RecipientStatus.ACTIVE, ConsentAction.CLEAR_BOUNCE, reason=None, source=source)
    return True


def opt_in_forgotten(session: Session, address: Address, *, reason: str | None, source: str) -> Recipient | None:
    """Lift an erasure for an address (`addresses.parse_address`) the person gives again (they asked to come back):
    the address becomes a new, active recipient with nothing of the old data. None if the address was not
    forgotten."""
    limits.check("the reason", reason, limits.REASON)
    normalized, key = address
    row = session.get(Suppression, email_hash(key))
    if row is None:
        return None
    session.delete(row)
    _record(session, key=key, recipient_id=None, action=ConsentAction.OPT_IN, reason=reason, source=source)
    recipient = new_recipient(normalized, key)
    session.add(recipient)
    session.flush()
    return recipient


def forget(session: Session, key: str, *, recipient: Recipient | None, source: str) -> tuple[str, bool]:
    """Erase a person: their row, memberships and audience links go (by cascade); their consent events lose the
    link to them and every free-text reason (what stays of each is its action, source and time); a suppression
    entry keeps the address from coming back. Works for an address no recipient holds yet (one known only to a
    queued import, say): it is suppressed all the same. Returns the hash kept, and whether anything changed."""

    digest = email_hash(key)
    already = session.get(Suppression, digest) is not None
    if not already:
        # First, so that on PostgreSQL the lock this takes on `suppression` comes before any on the person's rows:
        # an import segment takes that lock before it writes recipients (import_sql), so neither waits on the other
        # while holding what the other needs.
        session.add(Suppression(email_hash=digest, reason=None))
        session.flush()
    if recipient is not None:
        session.exec(delete(Signup).where(col(Signup.recipient_id) == recipient.id))
        session.exec(delete(GroupMember).where(col(GroupMember.recipient_id) == recipient.id))
        session.exec(delete(_CAMPAIGN_LINKS).where(_CAMPAIGN_LINKS.c.recipient_id == recipient.id))
        session.exec(
            update(ConsentEvent)
            .where(col(ConsentEvent.recipient_id) == recipient.id)
            .values(recipient_id=None)
            .execution_options(synchronize_session=False)
        )
        session.delete(recipient)
    session.exec(
        update(ConsentEvent)
        .where(col(ConsentEvent.email_hash) == digest)
        .values(reason=None, client_ip=None)
        .execution_options(synchronize_session=False)
    )
    if already and recipient is None:
        return digest, False
    session.flush()
    _record(session, key=key, recipient_id=None, action=ConsentAction.FORGET, reason=None, source=source)
    return digest, True


def latest_event(session: Session, recipient: Recipient) -> ConsentEvent | None:
    """The person's latest consent event (an undo link works only while it is the opt-out it undoes)."""
    return session.exec(
        select(ConsentEvent)
        .where(ConsentEvent.email_hash == email_hash(recipient.email_key))
        .order_by(col(ConsentEvent.id).desc())
        .limit(1)
    ).first()


def history(session: Session, recipient: Recipient) -> list[dict[str, Any]]:
    events = session.exec(
        select(ConsentEvent)
        .where(ConsentEvent.email_hash == email_hash(recipient.email_key))
        .order_by(col(ConsentEvent.id))
    ).all()
    return [
        {"action": e.action, "reason": e.reason, "source": e.source, "client_ip": e.client_ip, "at": e.created_at}
        for e in events
    ]
