"""One message outside the ledger: `cm campaign preview` renders it, `cm campaign send --test-to` sends it.

Both render for a sample recipient (the named one, or the first of the audience, or a stand-in when the audience
is empty). A test copy's links carry a `test` token, which changes nothing when used; the ledger is not touched.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from campaign_manager.audience import consent
from campaign_manager.audience.addresses import parse_address
from campaign_manager.audience.recipients import get_recipient
from campaign_manager.errors import ConsentError, InvalidInput
from campaign_manager.notifiers import Message, NotifierDown, Result, needs
from campaign_manager.sending.campaigns import audience_query, get_campaign
from campaign_manager.sending.service import check_campaign, make_renderer, resolve_notifier
from campaign_manager.tables.audience import Recipient

if TYPE_CHECKING:
    from campaign_manager.config import Settings
    from campaign_manager.sending.render import Renderer, Target


def _sample(session: Session, campaign_id: int, recipient: str | None, *, to: str | None = None) -> Target:
    """What to render for: the named recipient, else the first of the audience, else a stand-in; sent to `to`
    (a test copy's address) when given."""
    from campaign_manager.sending.render import Target

    if recipient is not None:
        person: Recipient | None = get_recipient(session, recipient)
    else:
        person = session.exec(
            select(Recipient).where(col(Recipient.id).in_(audience_query(campaign_id))).order_by(col(Recipient.id))
        ).first()
    if person is None:
        return Target(0, 0, to or "sample@example.com", "Sample Person", None, {})
    attributes = dict(person.attributes or {})
    return Target(0, int(person.id or 0), to or person.email, person.name, person.phone, attributes)


def preview(session: Session, settings: Settings, ref: str | int, *, recipient: str | None = None) -> Message:
    """The message the campaign would send the recipient (a sample when not named), rendered with a test token."""
    from campaign_manager.notifiers import Need

    campaign = get_campaign(session, ref)
    check_campaign(settings, campaign)
    sample = _sample(session, int(campaign.id or 0), recipient)
    return _render(make_renderer(session, settings, campaign, need=Need.EMAIL, test=True), sample)


def _render(renderer: Renderer, sample: Target) -> Message:
    """The sample's message, or a one-line error saying why it cannot be rendered (an undefined variable ...)."""
    from campaign_manager.sending.render import RenderError

    try:
        return renderer.render(sample)
    except RenderError as exc:
        raise InvalidInput(f"cannot render the campaign for this recipient: {exc.reason}") from None


def send_test(
    session: Session,
    settings: Settings,
    ref: str | int,
    to: str,
    *,
    recipient: str | None = None,
    notifier: str | None = None,
) -> tuple[str, Result]:
    """Send one copy, rendered for the sample, to `to`. An address that may not be mailed (opted out, bounced,
    forgotten) is refused. Returns the notifier's name and its result."""
    campaign = get_campaign(session, ref)
    name, cls = resolve_notifier(settings, notifier or campaign.notifier)
    check_campaign(settings, campaign)
    address = parse_address(to)
    held = session.exec(select(Recipient).where(Recipient.email_key == address.key)).first()
    if consent.is_forgotten(session, address.key) or (held is not None and not consent.may_mail(held.status)):
        raise ConsentError(
            f"{address.email} may not be mailed ({consent.skip_reason(None if held is None else held.status)})"
        )
    sample = _sample(session, int(campaign.id or 0), recipient, to=address.email)
    message = _render(make_renderer(session, settings, campaign, need=needs(cls), test=True), sample)
    return name, asyncio.run(send_one(cls(settings.notifiers[name]), message))


async def send_one(notifier: Any, message: Message) -> Result:
    """One message through a notifier, outside any ledger (a test copy, a sign-up's confirmation): open, send, close.
    The notifier being down is a retry."""

    async def call(name: str, *args: Any) -> Any:
        method = getattr(notifier, name, None)
        if method is None:
            return None
        if inspect.iscoroutinefunction(method):
            return await method(*args)
        return await asyncio.to_thread(method, *args)

    await call("open")
    try:
        results = await call("send_batch", [message])
    except NotifierDown as exc:
        return Result.retry(exc.reason)
    finally:
        await call("close")
    [result] = results
    return result  # type: ignore[no-any-return]
