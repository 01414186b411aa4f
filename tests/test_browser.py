"""cm serve's public pages in a real browser (tests/browser.py: headless chromium on a phone's screen), against a
real `cm serve` process (tests/serve_process.py), as a person uses them:

- the unsubscribe link of a message the `outbox` notifier wrote (a campaign sent with `serve.base_url` set to the
  running server): its page, the Unsubscribe button, the confirmation, Undo;
- the sign-up form, then the confirmation link of the message the server wrote to its outbox, then Confirm.

Each step is checked in the database, every page is saved as a screenshot under the test's tmp_path
(`screens/`) and checked: no <script>, readable on the phone (no horizontal scroll)."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlmodel import col, select

from browser import Browser, browser_fixture  # noqa: F401  (fixture `browser`: see the module)
from campaign_manager import api
from campaign_manager.audience.address_keys import email_hash, email_key
from campaign_manager.db import dispose_engines
from campaign_manager.models import ConsentEvent
from campaign_manager.states import ConsentAction, RecipientStatus
from serve_process import ServeProcess

Serve = Callable[..., ServeProcess]
FROM = "News <news@example.com>"


def _messages(folder: Path) -> list[EmailMessage]:
    return [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for path in sorted(folder.glob("*.eml"))
    ]


def _links(message: EmailMessage, server: ServeProcess, path: str) -> list[str]:
    """The server's links under `path` in the message (its headers and its text), in order, without repeats."""
    text = str(message.get("List-Unsubscribe", "")) + "\n"
    for part in message.walk():
        if part.get_content_type() in ("text/plain", "text/html"):
            text += part.get_content()
    found = re.findall(re.escape(server.url + path) + r"[A-Za-z0-9_-]+", text)
    return list(dict.fromkeys(found))


def _status(db_url: str, address: str) -> str:
    try:
        with api.open_session(db_url, write=False) as session:
            recipient = api.find_recipient(session, address)
            return "missing" if recipient is None else str(recipient.status)
    finally:
        dispose_engines()


def _events(db_url: str, address: str) -> list[tuple[str, str, str | None]]:
    """The person's consent events, oldest first: (action, source, client IP)."""
    try:
        with api.open_session(db_url, write=False) as session:
            rows = session.exec(
                select(ConsentEvent)
                .where(ConsentEvent.email_hash == email_hash(email_key(address)))
                .order_by(col(ConsentEvent.id))
            ).all()
            return [(row.action, row.source, row.client_ip) for row in rows]
    finally:
        dispose_engines()


def _send(db_url: str, server: ServeProcess, folder: Path, addresses: list[str]) -> Path:
    """A campaign to `addresses`, sent through the outbox with serve.base_url set to the server; its folder."""
    outbox = folder / "sent"
    config = folder / "send.toml"
    config.write_text(
        f'[send]\nfrom = "{FROM}"\nnotifier = "outbox"\n\n[serve]\nbase_url = "{server.url}"\n\n'
        f'[notifiers.outbox]\npath = "{outbox}"\n',
        encoding="utf-8",
    )
    settings = api.load_settings(str(config), {"database.url": db_url})
    with api.open_session(db_url) as session:
        api.create_group(session, "news")
        api.add_recipients(session, "news", addresses)
        campaign = api.create_campaign(
            session, title="May", subject="News", text="Hello.\n\nUnsubscribe: {{ unsubscribe_url }}\n", groups=["news"]
        )
        campaign_id = campaign.id or 0
    api.submit_job(settings, lambda s: api.queue_send(s, settings, campaign_id, notifier="outbox").job)
    assert api.drain(settings).ok
    dispose_engines()
    return outbox


def test_unsubscribe_and_undo(db_url: str, serve_factory: Serve, browser: Browser, tmp_path: Path) -> None:
    server = serve_factory(db_url, config=f'[send]\nfrom = "{FROM}"\n')
    ada, grace = "ada@example.com", "grace@example.com"
    outbox = _send(db_url, server, tmp_path, [ada, grace])
    sent = {str(m["To"]): m for m in _messages(outbox)}
    assert sorted(sent) == [ada, grace]
    links = _links(sent[ada], server, "/u/")
    assert len(links) == 1, links  # the header's link and the body's are the same one

    browser.open(links[0])
    # Opening the link changes nothing (mail scanners open links), and the page does not show the whole address.
    assert _status(db_url, ada) == RecipientStatus.ACTIVE and _events(db_url, ada) == []
    assert ada not in browser.text()
    browser.click("Unsubscribe")
    assert "unsubscribed" in browser.text().lower()
    assert _status(db_url, ada) == RecipientStatus.OPTED_OUT
    assert _events(db_url, ada) == [(ConsentAction.OPT_OUT, "web", "127.0.0.1")]
    assert _status(db_url, grace) == RecipientStatus.ACTIVE
    browser.click("Undo")
    assert "subscribed again" in browser.text().lower()
    assert _status(db_url, ada) == RecipientStatus.ACTIVE
    assert _events(db_url, ada)[1:] == [(ConsentAction.OPT_IN, "web-undo", "127.0.0.1")]
    assert len(browser.shots) == 3


def test_sign_up_and_confirm(db_url: str, serve_factory: Serve, browser: Browser, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    config = f'[send]\nfrom = "{FROM}"\nnotifier = "outbox"\n\n[notifiers.outbox]\npath = "{outbox}"\n'
    server = serve_factory(db_url, config=config)
    address = "zoe@example.com"

    browser.open(server.url + "/subscribe")
    browser.fill({"email": address, "name": "Zoë"})
    browser.submit()
    assert _status(db_url, address) == RecipientStatus.PENDING
    messages = _messages(outbox)
    assert [str(m["To"]) for m in messages] == [address]
    links = _links(messages[0], server, "/confirm/")
    assert len(links) == 1, links

    browser.open(links[0])
    assert _status(db_url, address) == RecipientStatus.PENDING  # opening the link changes nothing
    browser.submit()
    assert _status(db_url, address) == RecipientStatus.ACTIVE


def test_index_page(sqlite_url: str, serve_factory: Serve, browser: Browser) -> None:
    server = serve_factory(sqlite_url)
    browser.open(server.url + "/")
    assert "Sign up" in browser.text()
    browser.click("Sign up")
    assert browser.driver.current_url == server.url + "/subscribe"


PAGE = '<!doctype html><html><head><meta name="viewport" content="width=device-width, initial-scale=1"></head><body>{}'


def test_the_page_check_catches_what_it_is_for(browser: Browser) -> None:
    """The checks every page gets can fail: a page too wide for the phone, one with a script, one without the
    viewport meta tag (a phone would lay it out 980 px wide and shrink it); a plain page passes."""
    browser.open("data:text/html," + PAGE.format("<p>fits</p>"))
    bad = {
        "scrolls sideways": PAGE.format('<div style="width: 600px">wide</div>'),
        "<script>": PAGE.format("<p>x</p><script>1</script>"),
        "no viewport meta tag": "<!doctype html><html><body><p>no viewport</p>",
    }
    for message, html in bad.items():
        with pytest.raises(AssertionError, match=message):
            browser.open("data:text/html," + html)
    assert len(browser.shots) == 4
