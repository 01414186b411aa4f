"""Messages, settings and a sending loop for the email notifier's tests (test_email_*.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from campaign_manager.notifiers import Message, NotifierDown, Result
from campaign_manager.notifiers.email import EmailNotifier, EmailSettings

# Lines that dot-stuffing must double and the server undo: a dot alone would end the data early if not stuffed.
BODY = "Hello {i}\r\n.a line that starts with a dot\r\n.\r\n..\r\n. \r\nlast line\r\n"


class Endpoint(Protocol):
    host: str
    port: int


def message(i: int, *, to: str | None = None, body: str = BODY) -> Message:
    to = to or f"user{i}@example.com"
    message_id = f"<{i}.test@example.com>"
    head = f"From: News <news@example.com>\r\nTo: {to}\r\nSubject: number {i}\r\nMessage-ID: {message_id}\r\n\r\n"
    return Message(
        key=f"1-{i}",
        to=to,
        sender="News <news@example.com>",
        envelope_from="news@example.com",
        subject=f"number {i}",
        text="",
        data=(head + body.format(i=i)).encode(),
        message_id=message_id,
    )


def messages(count: int, start: int = 0) -> list[Message]:
    return [message(i) for i in range(start, start + count)]


def settings(server: Endpoint, **overrides: Any) -> EmailSettings:
    values: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "tls": "none",
        "connections": 2,
        "timeout": 5.0,
        "helo": "client.test",
    }
    return EmailSettings(**{**values, **overrides})


async def feed(items: Sequence[Message]) -> AsyncIterator[Message]:
    for item in items:
        yield item


async def collect(
    notifier: EmailNotifier, items: Sequence[Message]
) -> tuple[list[tuple[Message, Result]], NotifierDown | None]:
    """Every (message, result) the stream gave, and the NotifierDown it ended with, if any."""
    got: list[tuple[Message, Result]] = []
    try:
        async for pair in notifier.stream(feed(items)):
            got.append(pair)
    except NotifierDown as exc:
        return got, exc
    return got, None


def send(config: EmailSettings, items: Sequence[Message]) -> tuple[dict[str, Result], NotifierDown | None]:
    """Opens a notifier, streams `items`, closes it: results by message key (at most one each), and the
    NotifierDown of open() or of the stream."""

    async def run() -> tuple[list[tuple[Message, Result]], NotifierDown | None]:
        notifier = EmailNotifier(config)
        try:
            await notifier.open()
            return await collect(notifier, items)
        except NotifierDown as exc:
            return [], exc
        finally:
            await notifier.close()

    pairs, down = asyncio.run(run())
    results = {m.key: r for m, r in pairs}
    assert len(results) == len(pairs), "a message got two results"
    return results, down


def sent_all(results: dict[str, Result], items: Sequence[Message]) -> bool:
    return set(results) == {m.key for m in items} and all(r.outcome == "sent" for r in results.values())
