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
from selenium.webdriver.common.by import By
from sqlmodel import col, select

import serve_process
from browser import Browser, browser_fixture  # noqa: F401  (fixture `browser`: see the module)
from campaign_manager import api
from campaign_manager.audience.address_keys import email_hash, email_key
from campaign_manager.db import dispose_engines
from campaign_manager.models import ConsentEvent
from campaign_manager.states import ConsentAction, RecipientStatus
from serve_process import ServeProcess
from signup_helpers import open_site

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
    assert links[0] in str(sent[ada]["List-Unsubscribe"]) and links[0] in sent[ada].get_body().get_content()
    assert sent[ada]["List-Unsubscribe-Post"] is None  # RFC 8058 one-click is for https links; this server is http

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


def test_sign_up_and_confirm(
    db_url: str, serve_factory: Serve, browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's own address is its serve.base_url, so that the link in the message is the one the browser opens.
    port = serve_process.free_port()
    monkeypatch.setattr(serve_process, "free_port", lambda: port)
    with api.open_session(db_url) as session:
        api.create_group(session, "news", description="monthly")
        api.update_group(session, "news", public=True)
        api.create_group(session, "staff")  # not public: not offered
    site = open_site(db_url, tmp_path / "site", serve_factory, base_url=f"http://127.0.0.1:{port}")
    server, address = site.server, "zoe@example.com"

    browser.open(server.url + "/subscribe")
    assert [o.text for o in browser.options("group")] == ["news: monthly"]
    browser.fill({"email": address, "name": "Zoë Lovelace"})
    browser.submit()
    assert "check your inbox" in browser.text().lower()
    assert _status(db_url, address) == RecipientStatus.PENDING and _events(db_url, address) == []
    site.drain()  # the worker mails the confirmation
    messages = _messages(site.outbox)
    assert [m["To"].addresses[0].addr_spec for m in messages] == [address]
    links = _links(messages[0], server, "/confirm/")
    assert len(links) == 1, links

    browser.open(links[0])
    assert _status(db_url, address) == RecipientStatus.PENDING  # opening the link changes nothing
    assert address not in browser.text()
    browser.submit()
    assert "signed up" in browser.text().lower()
    assert _status(db_url, address) == RecipientStatus.ACTIVE
    assert _events(db_url, address) == [(ConsentAction.OPT_IN, "cm serve sign-up confirmed", "127.0.0.1")]
    with api.open_session(db_url, write=False) as session:
        person = api.get_recipient(session, address)
        assert person.name == "Zoë Lovelace"
        assert [r["email"] for r in api.iter_recipients(session, api.group_recipients(session, "news"))] == [address]
    dispose_engines()
    assert len(browser.shots) == 4


def test_index_page(sqlite_url: str, serve_factory: Serve, browser: Browser) -> None:
    server = serve_factory(sqlite_url)
    browser.open(server.url + "/")
    assert "Sign up" in browser.text()
    browser.click("Sign up")
    assert browser.driver.current_url == server.url + "/subscribe"


def test_the_other_pages_fit_a_phone(sqlite_url: str, serve_factory: Serve, browser: Browser, tmp_path: Path) -> None:
    """The pages a person meets when something is wrong: a link that does not work (altered or expired), and the
    form sent back with a problem, its long address kept in the field and the problem said."""
    site = open_site(sqlite_url, tmp_path / "site", serve_factory)
    server = site.server
    for path in ("/u/" + "A" * 44, "/u/short", "/confirm/" + "B" * 44):
        browser.open(server.url + path)
        assert "not valid" in browser.text() or "does not work" in browser.text(), path
    browser.open(server.url + "/subscribe")
    long = "a.very.long.address.that.goes.on.and.on.without.a.space.anywhere" + "@example.test"
    browser.fill({"email": long, "name": "N" * 120})
    browser.submit()  # the browser finds nothing wrong with it; the server does
    assert browser.driver.find_element(By.NAME, "email").get_attribute("value") == long
    assert browser.driver.find_elements(By.CSS_SELECTOR, "[role=alert]")
    assert _status(sqlite_url, long) == "missing"


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
