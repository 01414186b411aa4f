"""The delivery ledger: one row per recipient of a campaign, written when its send starts, claimed in batches by
the sender and updated with each result.

- Written in segments of recipient ids (`write_segment`), each its own short transaction, so a million-recipient
  audience never holds the write lock for long and a send interrupted while writing it goes on where it stopped.
  The unique (campaign, recipient) pair makes every segment safe to run twice, and `--new` reuses it to add only
  people not yet in the ledger.
- A claim (`claim`) takes the next pending deliveries whose recipient is mailable *in the same statement*, so an
  opt-out that commits before a claim is honoured by it; each claimed row carries a token and a lease, and results
  are written only where the token still matches (`record`), so a run that lost its claim cannot overwrite a newer
  one. PostgreSQL claims with FOR UPDATE SKIP LOCKED, so that several workers share a campaign.
- The ledger holds ids, never addresses; `forget` deletes the recipient and the row stays, anonymised.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import sqlalchemy as sa
from sqlmodel import Session

from campaign_manager.audience import consent
from campaign_manager.notifiers import Outcome, Result
from campaign_manager.states import DeliveryStatus
from campaign_manager.tables.audience import GroupMember, Recipient
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import Meta
from campaign_manager.tables.sending import CampaignGroup, CampaignRecipient, Delivery

# The tables, for Core statements (set-based: no ORM objects per delivery).
if TYPE_CHECKING:
    from campaign_manager.config import Settings

DELIVERY: sa.Table = Delivery.__table__  # type: ignore[attr-defined]
RECIPIENT: sa.Table = Recipient.__table__  # type: ignore[attr-defined]
GROUP_MEMBER: sa.Table = GroupMember.__table__  # type: ignore[attr-defined]
CAMPAIGN_GROUP: sa.Table = CampaignGroup.__table__  # type: ignore[attr-defined]
CAMPAIGN_RECIPIENT: sa.Table = CampaignRecipient.__table__  # type: ignore[attr-defined]
# Recipient ids a ledger segment covers: ~0.2 s of inserts on SQLite, well under the write-lock bound.
SEGMENT_IDS = 50_000
_ADDRESS = re.compile(r"[^\s<>\"'@,;:]+@[^\s<>\"',;:]+")
CANCELLED_REASON = "cancelled"


class Target(NamedTuple):
    """A claimed delivery, with what rendering it needs."""

    delivery_id: int
    recipient_id: int
    email: str
    name: str | None
    phone: str | None
    attributes: dict[str, Any]
    attempts: int


# ------------------------------------------------------------------------------------- the database's identity


def identity(session: Session) -> tuple[str, bytes]:
    """The database's id (the first part of every idempotency key) and its own signing secret, made once."""
    found: dict[str, str] = {}
    for key, size in (("database_id", 6), ("signing_secret", 32)):
        row = session.get(Meta, key)
        if row is None:  # a database made from the models rather than the migrations
            row = Meta(key=key, value=secrets.token_hex(size))
            session.add(row)
            session.flush()
        found[key] = row.value
    return found["database_id"], bytes.fromhex(found["signing_secret"])


def signing_secrets(settings: Settings, own: bytes) -> list[bytes]:
    """The secrets tokens are checked against, the signing one first: `unsubscribe.secret` when set, then the
    database's own (`own`, from `identity`): setting the key later breaks no link already sent. Then
    `unsubscribe.old_secrets`, the secrets of a rotation: they only check, never sign, so they always come after."""
    found: list[bytes] = []
    for secret in (
        settings.unsubscribe.secret.encode(),
        own,
        *(old.encode() for old in settings.unsubscribe.old_secrets),
    ):
        if secret and secret not in found:
            found.append(secret)
    return found


# ------------------------------------------------------------------------------------------------ writing it


def _targets(campaign_id: int, low: int, high: int) -> Any:
    """The recipient ids in (low, high] the campaign goes to: members of its groups and its named recipients."""
    members, links, named = GROUP_MEMBER.c, CAMPAIGN_GROUP.c, CAMPAIGN_RECIPIENT.c
    in_groups = sa.select(members.recipient_id).where(
        members.group_id.in_(sa.select(links.group_id).where(links.campaign_id == campaign_id)),
        members.recipient_id > low,
        members.recipient_id <= high,
    )
    by_name = sa.select(named.recipient_id).where(
        named.campaign_id == campaign_id, named.recipient_id > low, named.recipient_id <= high
    )
    return sa.union(in_groups, by_name)


def _rows(result: Any) -> int:
    """Rows an UPDATE or INSERT changed."""
    return int(getattr(result, "rowcount", 0) or 0)


def write_segment(session: Session, campaign_id: int, low: int, high: int) -> int:
    """Add the campaign's recipients with ids in (low, high] to its ledger (those already in it stay as they are):
    `pending` if they may be mailed, else `skipped` with the consent module's reason. Returns the rows added."""
    r = RECIPIENT.alias("r")
    status = sa.case(
        (sa.text(consent.sql_mailable("r.status")), sa.literal(DeliveryStatus.PENDING)),
        else_=sa.literal(DeliveryStatus.SKIPPED),
    )
    reason = sa.case(
        (sa.text(consent.sql_mailable("r.status")), sa.null()), else_=sa.text(consent.sql_skip_reason("r.status"))
    )
    already = sa.select(DELIVERY.c.id).where(DELIVERY.c.campaign_id == campaign_id, DELIVERY.c.recipient_id == r.c.id)
    rows = sa.select(sa.literal(campaign_id), r.c.id, status, reason, sa.literal(0), sa.literal(0), sa.false()).where(
        r.c.id.in_(_targets(campaign_id, low, high)), ~sa.exists(already)
    )
    insert = DELIVERY.insert().from_select(
        ["campaign_id", "recipient_id", "status", "last_error", "attempts", "uncertain", "bounced"], rows
    )
    return _rows(session.execute(insert))


def last_recipient_id(session: Session) -> int:
    return int(session.execute(sa.select(sa.func.max(RECIPIENT.c.id))).scalar() or 0)


# -------------------------------------------------------------------------------------------------- claiming


def claim(session: Session, campaign_id: int, *, token: str, limit: int, lease: float) -> list[Target]:
    """Claim up to `limit` pending deliveries that are due, whose recipient may be mailed now (checked in this
    statement), that no live claim holds. Returns them in id order."""
    now = utcnow()
    d, r = DELIVERY, RECIPIENT
    due = (
        sa.select(d.c.id)
        .join(r, r.c.id == d.c.recipient_id)
        .where(
            d.c.campaign_id == campaign_id,
            d.c.status == DeliveryStatus.PENDING,
            sa.or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now),
            sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now),
            consent.mailable(),
        )
        .order_by(d.c.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(of=d, skip_locked=True)
    conn = session.connection()  # Core, not the ORM's statement path
    claimed = conn.execute(
        d.update()
        .where(d.c.id.in_(due.scalar_subquery()))
        .values(claim_token=token, claimed_until=now + timedelta(seconds=lease))
        .returning(d.c.id)
    ).all()
    if not claimed:
        return []
    ids = sorted(row[0] for row in claimed)  # at most `limit`: a bounded IN
    # A plain statement: the claimed rows are most of a send's reads, and SQLAlchemy's row processing cost more
    # than the query. The attributes come back decoded from PostgreSQL (json), as text from SQLite.
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    rows = conn.exec_driver_sql(
        "SELECT d.id, r.id, r.email, r.name, r.phone, r.attributes, d.attempts FROM delivery d"
        f" JOIN recipient r ON r.id = d.recipient_id WHERE d.id IN ({', '.join([mark] * len(ids))}) ORDER BY d.id",
        tuple(ids),
    ).all()
    return [
        Target(did, rid, email, name, phone, _attributes(attributes), attempts)
        for did, rid, email, name, phone, attributes, attempts in rows
    ]


def _attributes(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    found = json.loads(value) if value else {}
    return found if isinstance(found, dict) else {}


def release(session: Session, token: str, delivery_ids: Sequence[int]) -> None:
    """Give back claimed deliveries that were never handed to the notifier (a pause, the notifier down): no
    attempt counted, claimable again at once."""
    if delivery_ids:
        session.execute(
            DELIVERY.update()
            .where(DELIVERY.c.id.in_(list(delivery_ids)), DELIVERY.c.claim_token == token)
            .values(claim_token=None, claimed_until=None)
        )


# ------------------------------------------------------------------------------------------------- recording


class Outcomes(NamedTuple):
    """What one `record` wrote: counts by what became of each delivery, and the hard bounces."""

    sent: int
    retried: int
    failed: int
    skipped: int
    lost: int  # results not written: this run's claim on them had been taken over


def scrub(reason: str, address: str | None = None) -> str:
    """An error text without addresses (the ledger holds none): the recipient's, and any other, become
    `<recipient>`; one line, bounded."""
    text = " ".join(reason.split())
    if address:
        text = text.replace(address, "<recipient>")
    return _ADDRESS.sub("<recipient>", text)[:500]


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones: base, 2 base, 4 base ..., at most `cap`."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


def record(
    session: Session,
    token: str,
    results: Sequence[tuple[Target, Result]],
    *,
    max_attempts: int,
    retry_base: float,
    retry_cap: float,
    source: str,
) -> Outcomes:
    """Write a batch of results, each only where this run's claim still holds. A retry counts an attempt and waits
    (exponential backoff, or the provider's Retry-After if longer); at `max_attempts` it fails. A hard bounce
    makes the recipient `bounced` through the consent rules."""
    now = utcnow()
    d = DELIVERY
    sent: list[tuple[str | None, int]] = []
    retry, failed, skipped = [], [], []
    bounces: list[tuple[int, str]] = []
    for target, result in results:
        row: dict[str, Any] = {"did": target.delivery_id, "tok": token}
        if result.outcome == Outcome.SENT:
            sent.append((result.provider_id[:300] or None, target.delivery_id))
            continue
        reason = scrub(result.reason or result.outcome, target.email)
        if result.outcome == Outcome.SKIPPED:  # the sender's own verdict (no phone, say)
            skipped.append({**row, "err": reason})
        elif result.outcome == Outcome.RETRY and target.attempts + 1 < max_attempts:
            wait = max(backoff(target.attempts + 1, retry_base, retry_cap), result.retry_after or 0.0)
            retry.append({**row, "err": reason, "next": now + timedelta(seconds=wait), "unsure": int(result.uncertain)})
        else:
            if result.outcome == Outcome.RETRY:
                reason = f"{reason} (after {target.attempts + 1} attempts)"
            failed.append({**row, "err": reason, "bounce": result.bounce, "unsure": int(result.uncertain)})
            if result.bounce:
                bounces.append((target.recipient_id, reason))
    # Core on the session's connection: the ORM's UPDATE path cost ~40 us a row here.
    conn = session.connection()
    mine = sa.and_(d.c.id == sa.bindparam("did"), d.c.claim_token == sa.bindparam("tok"))
    release_claim = {"claim_token": None, "claimed_until": None}
    written = _record_sent(conn, token, now, sent)
    for rows, values in (
        (
            retry,
            {
                "attempts": d.c.attempts + 1,
                "last_error": sa.bindparam("err"),
                "next_attempt_at": sa.bindparam("next"),
                "uncertain": d.c.uncertain + sa.bindparam("unsure"),
            },
        ),
        (
            failed,
            {
                "status": DeliveryStatus.FAILED,
                "attempts": d.c.attempts + 1,
                "last_error": sa.bindparam("err"),
                "bounced": sa.bindparam("bounce"),
                "uncertain": d.c.uncertain + sa.bindparam("unsure"),
            },
        ),
        (skipped, {"status": DeliveryStatus.SKIPPED, "last_error": sa.bindparam("err")}),
    ):
        if rows:
            written += _rows(conn.execute(d.update().where(mine).values(**values, **release_claim), rows))
    for recipient_id, reason in bounces:
        consent.bounce(session, recipient_id, reason=reason, source=source)
    lost = len(results) - written
    return Outcomes(len(sent), len(retry), len(failed), len(skipped), max(0, lost))


def _record_sent(conn: Any, token: str, now: datetime, rows: list[tuple[str | None, int]]) -> int:
    """The messages sent, as one executemany of a plain statement: most results are these, and SQLAlchemy's own
    executemany cost ~40 us a row in parameter handling (a tenth of a message's whole cost)."""
    if not rows:
        return 0
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    at = DELIVERY.c.sent_at.type.bind_processor(conn.dialect)
    sql = (
        f"UPDATE delivery SET status = '{DeliveryStatus.SENT}', attempts = attempts + 1, sent_at = {mark},"
        f" provider_id = {mark}, last_error = NULL, claim_token = NULL, claimed_until = NULL"
        f" WHERE id = {mark} AND claim_token = {mark}"
    )
    when = at(now) if at is not None else now
    return _rows(conn.exec_driver_sql(sql, [(when, provider, did, token) for provider, did in rows]))


# ------------------------------------------------------------------------------------------ ending and counts


def sweep(session: Session, campaign_id: int) -> int:
    """Mark skipped the pending deliveries whose recipient may no longer be mailed (opted out, bounced or
    forgotten since the ledger was written), with the reason. Returns how many."""
    d, r = DELIVERY, RECIPIENT
    stale = sa.or_(
        d.c.recipient_id.is_(None),
        d.c.recipient_id.in_(sa.select(r.c.id).where(sa.not_(consent.mailable()))),
    )
    # The recipient's status, NULL when the row is gone (forgotten).
    reason = sa.text(
        consent.sql_skip_reason("(SELECT status FROM recipient WHERE recipient.id = delivery.recipient_id)")
    )
    done = session.execute(
        d.update()
        .where(d.c.campaign_id == campaign_id, d.c.status == DeliveryStatus.PENDING, stale)
        .values(status=DeliveryStatus.SKIPPED, last_error=reason, claim_token=None, claimed_until=None)
    )
    return _rows(done)


def next_due(session: Session, campaign_id: int) -> tuple[int, datetime | None]:
    """(pending deliveries left, when the earliest of them can next be claimed: None if one can be now)."""
    d = DELIVERY
    now = utcnow()
    pending, earliest_retry, earliest_lease = session.execute(
        sa.select(sa.func.count(), sa.func.min(d.c.next_attempt_at), sa.func.min(d.c.claimed_until)).where(
            d.c.campaign_id == campaign_id, d.c.status == DeliveryStatus.PENDING
        )
    ).one()
    if not pending:
        return 0, None
    due = session.execute(
        sa.select(sa.func.count()).where(
            d.c.campaign_id == campaign_id,
            d.c.status == DeliveryStatus.PENDING,
            sa.or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now),
            sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now),
        )
    ).scalar()
    if due:
        return int(pending), None
    times = [t for t in (earliest_retry, earliest_lease) if t is not None and t > now]
    return int(pending), (min(times) if times else now)


def counts(session: Session, campaign_id: int) -> dict[str, int]:
    """Deliveries by status (every status present, 0 when none)."""
    rows = dict(
        session.execute(
            sa.select(DELIVERY.c.status, sa.func.count())
            .where(DELIVERY.c.campaign_id == campaign_id)
            .group_by(DELIVERY.c.status)
        ).all()
    )
    return {str(status): int(rows.get(status, 0)) for status in DeliveryStatus}


def cancel_pending(session: Session, campaign_id: int, *, limit: int = SEGMENT_IDS) -> int:
    """Mark up to `limit` pending deliveries skipped (reason `cancelled`); the caller repeats, a transaction each,
    until none is left. Returns how many."""
    d = DELIVERY
    some = (
        sa.select(d.c.id)
        .where(d.c.campaign_id == campaign_id, d.c.status == DeliveryStatus.PENDING)
        .order_by(d.c.id)
        .limit(limit)
        .scalar_subquery()
    )
    done = session.execute(
        d.update()
        .where(d.c.id.in_(some))
        .values(status=DeliveryStatus.SKIPPED, last_error=CANCELLED_REASON, claim_token=None, claimed_until=None)
    )
    return _rows(done)


def requeue_failed(session: Session, campaign_id: int, *, include_bounced: bool, limit: int = SEGMENT_IDS) -> int:
    """`cm campaign retry`: up to `limit` failed deliveries back to pending with their attempts reset (hard bounces
    only with `include_bounced`; their recipient stays `bounced`, and so skipped, until the bounce is cleared)."""
    d = DELIVERY
    where = [d.c.campaign_id == campaign_id, d.c.status == DeliveryStatus.FAILED]
    if not include_bounced:
        where.append(d.c.bounced == sa.false())
    some = sa.select(d.c.id).where(*where).order_by(d.c.id).limit(limit).scalar_subquery()
    done = session.execute(
        d.update()
        .where(d.c.id.in_(some))
        .values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=None, claim_token=None, claimed_until=None)
    )
    return _rows(done)


def bounced_recipients(session: Session, campaign_id: int, *, after: int, limit: int = 1000) -> list[Recipient]:
    """A page (by id, after `after`) of the recipients whose delivery of this campaign failed as a hard bounce."""
    ids = (
        sa.select(DELIVERY.c.recipient_id)
        .where(
            DELIVERY.c.campaign_id == campaign_id,
            DELIVERY.c.status == DeliveryStatus.FAILED,
            DELIVERY.c.bounced == sa.true(),
            DELIVERY.c.recipient_id > after,
        )
        .order_by(DELIVERY.c.recipient_id)
        .limit(limit)
    )
    return list(session.scalars(sa.select(Recipient).where(RECIPIENT.c.id.in_(ids)).order_by(RECIPIENT.c.id)))
