"""What a campaign's ledger says: `cm campaign stats` and `cm campaign deliveries`, and a person's deliveries for
`cm recipient export`. Every query is bounded: counts and groupings in SQL, listings a page at a time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from campaign_manager.errors import InvalidInput
from campaign_manager.sending.campaigns import get_campaign
from campaign_manager.sending.ledger import DELIVERY, RECIPIENT, counts
from campaign_manager.states import DeliveryStatus

PAGE = 1000
TOP_REASONS = 5


def stats(session: Session, ref: str | int) -> dict[str, Any]:
    """Counts per status, attempts, the send rate, hard bounces, possible duplicates, the top failure reasons."""
    campaign = get_campaign(session, ref)
    cid = int(campaign.id or 0)
    d = DELIVERY.c
    attempts, bounces, uncertain, first, last = session.execute(
        sa.select(
            sa.func.coalesce(sa.func.sum(d.attempts), 0),
            sa.func.count().filter(d.bounced == sa.true()),
            sa.func.coalesce(sa.func.sum(d.uncertain), 0),
            sa.func.min(d.sent_at),
            sa.func.max(d.sent_at),
        ).where(d.campaign_id == cid)
    ).one()
    by_status = counts(session, cid)
    seconds = (last - first).total_seconds() if first is not None and last is not None else 0.0
    reasons = session.execute(
        sa.select(d.status, d.last_error, sa.func.count().label("n"))
        .where(
            d.campaign_id == cid,
            d.status.in_((DeliveryStatus.FAILED, DeliveryStatus.SKIPPED, DeliveryStatus.PENDING)),
            d.last_error.is_not(None),
        )
        .group_by(d.status, d.last_error)
        .order_by(sa.desc("n"))
        .limit(TOP_REASONS)
    ).all()
    return {
        "campaign_id": cid,
        "title": campaign.title,
        "status": campaign.status,
        "reason": campaign.status_reason,
        "notifier": campaign.notifier,
        "scheduled_at": campaign.scheduled_at,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "total": sum(by_status.values()),
        **by_status,
        "attempts": int(attempts),
        "hard_bounces": int(bounces),
        "possible_duplicates": int(uncertain),
        "send_rate": round(by_status[DeliveryStatus.SENT] / seconds, 1) if seconds > 0 else None,
        "top_reasons": [{"status": status, "reason": reason, "count": n} for status, reason, n in reasons],
    }


def iter_deliveries(session: Session, ref: str | int, *, status: str | None = None) -> Iterator[dict[str, Any]]:
    """Who got it and who did not, by delivery id, a page at a time. A forgotten person's row has no address."""
    cid = _checked(session, ref, status)
    last = 0
    while True:
        page = _deliveries(session, cid, status, after=last, limit=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        last = page[-1]["delivery_id"]


def deliveries_page(
    session: Session, ref: str | int, *, status: str | None = None, after: int = 0, limit: int
) -> list[dict[str, Any]]:
    """One page of `iter_deliveries` (the REST API's listing): delivery ids above `after`, at most `limit`."""
    return _deliveries(session, _checked(session, ref, status), status, after=after, limit=limit)


def _checked(session: Session, ref: str | int, status: str | None) -> int:
    campaign = get_campaign(session, ref)
    if status is not None and status not in set(DeliveryStatus):
        raise InvalidInput(f"--status must be one of {', '.join(DeliveryStatus)}, not {status!r}")
    return int(campaign.id or 0)


def _deliveries(session: Session, cid: int, status: str | None, *, after: int, limit: int) -> list[dict[str, Any]]:
    d, r = DELIVERY.c, RECIPIENT.c
    query = (
        sa.select(
            d.id, d.recipient_id, r.email, d.status, d.attempts, d.last_error, d.sent_at, d.provider_id, d.uncertain
        )
        .select_from(DELIVERY.outerjoin(RECIPIENT, r.id == d.recipient_id))
        .where(d.campaign_id == cid, d.id > after)
        .order_by(d.id)
        .limit(limit)
    )
    if status is not None:
        query = query.where(d.status == status)
    return [
        {
            "delivery_id": row.id,
            "recipient_id": row.recipient_id,
            "email": row.email,
            "status": row.status,
            "attempts": row.attempts,
            "error": row.last_error,
            "sent_at": row.sent_at,
            "provider_id": row.provider_id,
            "possible_duplicate": bool(row.uncertain),
        }
        for row in session.execute(query).all()
    ]
