"""Opting out by a message's token (`cm recipient opt-out --token`, for whoever reads the List-Unsubscribe mailto:
box; `cm serve` answers the https link with the same rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlmodel import Session

from campaign_manager.audience import consent
from campaign_manager.sending.ledger import identity, signing_secrets
from campaign_manager.tables.audience import Recipient

if TYPE_CHECKING:
    from campaign_manager.config import Settings


def opt_out_by_token(
    session: Session, settings: Settings, token: str, *, reason: str | None = None
) -> tuple[Recipient, bool] | None:
    """Verify an unsubscribe token and opt its person out (source `unsubscribe token`). None for a test token
    (it changes nothing) or a person forgotten since; BadToken (exit 2) for a bad, tampered or foreign one."""
    from campaign_manager.sending.tokens import BadToken, Purpose, read_token

    try:
        found = read_token(token.strip(), Purpose.UNSUBSCRIBE, signing_secrets(settings, identity(session)[1]))
    except BadToken:
        read_token(
            token.strip(), Purpose.TEST, signing_secrets(settings, identity(session)[1])
        )  # a test token: nothing to do
        return None
    recipient = session.get(Recipient, found.recipient_id)
    if recipient is None:
        return None
    return consent.opt_out(session, recipient, reason=reason, source="unsubscribe token")
