"""`cm serve`'s one-click unsubscribe and its pages, against a real `cm serve` process on SQLite and PostgreSQL,
called with urllib as a mail provider or a browser would: `POST /u/{token}` (RFC 8058), `GET /u/{token}` (a page
that changes nothing), `POST /undo/{token}`; refused tokens, secret rotation, and a campaign sent through the outbox
whose List-Unsubscribe link is POSTed."""

from __future__ import annotations

import email
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa

from campaign_manager import db
from campaign_manager.sending.tokens import BadToken, Purpose, make_token, read_token
from conftest import Run, make_cm
from serve_process import ServeProcess

Cm = Callable[..., Run]
SECRET = "the signing secret of these tests"
OLD = "a secret retired by a rotation"
FOREIGN = b"another installation's secret"
CONFIG = f"""
[send]
from = "News Team <news@example.com>"
[unsubscribe]
secret = "{SECRET}"
mailto = "unsub@example.com"
"""
PRIVATE = {"cache-control": "no-store", "referrer-policy": "no-referrer", "x-robots-tag": "noindex"}
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"


class Answer(NamedTuple):
    status: int
    headers: Message
    page: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect comes back as the 3xx itself: none is expected anywhere


_opener = urllib.request.build_opener(_NoRedirect)


def call(url: str, data: bytes | None = None, content_type: str = FORM) -> Answer:
    """GET, or POST `data`, as a plain HTTP client: no cookie, no session, no redirect followed."""
    headers = {"Content-Type": content_type} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with _opener.open(request, timeout=20) as answer:
            return Answer(answer.status, answer.headers, answer.read().decode())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers, exc.read().decode())


def one_click(url: str) -> Answer:
    """What a mail provider sends (RFC 8058)."""
    return call(url, ONE_CLICK)


def assert_private(answer: Answer) -> None:
    for name, value in PRIVATE.items():
        assert answer.headers[name] == value, name
    assert answer.headers.get_content_type() == "text/html"
    assert "<script" not in answer.page.lower()


def events(url: str, recipient_id: int) -> list[tuple[str, str, str | None, str | None]]:
    with db.get_engine(url).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT action, source, client_ip, reason FROM consent_event WHERE recipient_id = :r ORDER BY id"),
            {"r": recipient_id},
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def status_of(url: str, recipient_id: int) -> str | None:
    with db.get_engine(url).connect() as conn:
        found = conn.execute(sa.text("SELECT status FROM recipient WHERE id = :r"), {"r": recipient_id}).scalar()
    return None if found is None else str(found)


def latest_event_id(url: str, recipient_id: int) -> int:
    with db.get_engine(url).connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT max(id) FROM consent_event WHERE recipient_id = :r"), {"r": recipient_id}
            ).scalar_one()
        )


def undo_link(page: str, base: str) -> str:
    """The Undo form's URL, resolved against the page's, as a browser would."""
    found = re.search(r'<form method="post" action="([^"]+)">', page)
    assert found is not None, page
    return urllib.parse.urljoin(base, found.group(1))


class Site(NamedTuple):
    server: ServeProcess
    cm: Cm
    url: str  # the database's

    def person(self, address: str) -> int:
        return int(self.cm(["recipient", "create", address, "--json"]).json()["id"])

    def link(self, token: str) -> str:
        return f"{self.server.url}/u/{token}"


@pytest.fixture
def site(db_url: str, serve_factory: Callable[..., ServeProcess]) -> Site:
    return Site(serve_factory(db_url, config=CONFIG), make_cm(db_url), db_url)


def unsubscribe_token(recipient_id: int, campaign_id: int = 7, secret: str | bytes = SECRET) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return make_token(key, Purpose.UNSUBSCRIBE, recipient_id, campaign_id)


def test_one_click_post_opts_out_once_and_a_get_changes_nothing(site: Site) -> None:
    ada = site.person("ada.lovelace@example.com")
    token = unsubscribe_token(ada)
    # A mail scanner or a link preview fetches the link, twice: the page asks, and nothing changes.
    for _ in range(2):
        page = call(site.link(token))
        assert page.status == 200
        assert_private(page)
        assert "News Team" in page.page and "a***@example.com" in page.page
        assert "ada.lovelace" not in page.page
        assert '<form method="post">' in page.page and ">Unsubscribe</button>" in page.page
    assert status_of(site.url, ada) == "active" and events(site.url, ada) == []

    done = one_click(site.link(token))
    assert done.status == 200
    assert_private(done)
    assert "will get no more messages from News Team" in done.page
    assert status_of(site.url, ada) == "opted_out"
    assert events(site.url, ada) == [("opt_out", "one-click", "127.0.0.1", "campaign 7")]
    # A replay (the provider retries; the person clicks again) answers 200 and records nothing more.
    again = one_click(site.link(token))
    assert again.status == 200 and "Undo" not in again.page
    assert len(events(site.url, ada)) == 1
    assert "already unsubscribed" in call(site.link(token)).page
    log = site.server.stderr()
    assert token not in log and "ada.lovelace" not in log and "Traceback" not in log


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (ONE_CLICK, FORM),
        (  # RFC 8058 prefers multipart/form-data
            b'--XyZ\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n--XyZ--\r\n',
            "multipart/form-data; boundary=XyZ",
        ),
        (b"", "text/plain"),
        (b"via=web&" * 2000, FORM),  # more than a form of ours holds: read no further, and it is a one-click
    ],
    ids=["urlencoded", "multipart", "empty", "oversized"],
)
def test_any_post_body_is_a_one_click(site: Site, body: bytes, content_type: str) -> None:
    bob = site.person("bob@example.com")
    assert call(site.link(unsubscribe_token(bob)), body, content_type).status == 200
    assert [event[:2] for event in events(site.url, bob)] == [("opt_out", "one-click")]


def test_simultaneous_one_clicks_record_one_event(site: Site) -> None:
    """Providers retry, sometimes at once: the recipient's row is locked, so one opt-out is recorded."""
    cy = site.person("cy@example.com")
    link = site.link(unsubscribe_token(cy))
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(one_click(link).status)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * 8
    assert [event[0] for event in events(site.url, cy)] == ["opt_out"]


def test_the_page_button_then_undo_within_the_hour_once(site: Site) -> None:
    dee = site.person("dee@example.com")
    link = site.link(unsubscribe_token(dee))
    done = call(link, b"via=web")
    assert done.status == 200 and status_of(site.url, dee) == "opted_out"
    assert events(site.url, dee)[-1][:3] == ("opt_out", "web", "127.0.0.1")
    assert ">Undo</button>" in done.page
    undo = undo_link(done.page, link)
    assert undo.startswith(site.server.url + "/undo/")
    # The undo link is signed with the signing secret and names the opt-out it undoes.
    undo_token = undo.rsplit("/", 1)[1]
    found = read_token(undo_token, Purpose.UNDO, [SECRET.encode()])
    assert (found.recipient_id, found.ref_id) == (dee, latest_event_id(site.url, dee))
    # A GET (the address bar after the button, a reload) shows the button again and changes nothing.
    again = call(undo)
    assert again.status == 200 and ">Undo</button>" in again.page and undo_link(again.page, undo) == undo
    assert status_of(site.url, dee) == "opted_out"

    back = call(undo, b"")
    assert back.status == 200
    assert_private(back)
    assert "subscribed again" in back.page and "d***@example.com" in back.page
    assert status_of(site.url, dee) == "active"
    assert events(site.url, dee)[-1][:3] == ("opt_in", "web-undo", "127.0.0.1")
    # Once: the opt-out is no longer the latest event.
    twice = call(undo, b"")
    assert twice.status == 400 and "has expired" in twice.page and "unsub@example.com" in twice.page
    assert call(undo).status == 400  # nor is its page shown again
    assert [event[0] for event in events(site.url, dee)] == ["opt_out", "opt_in"]

    # Only while the opt-out is the latest event: the operator's changes since make it stale.
    undo = undo_link(call(link, b"via=web").page, link)
    site.cm("recipient opt-in dee@example.com")
    site.cm("recipient opt-out dee@example.com")
    assert call(undo, b"").status == 400
    assert status_of(site.url, dee) == "opted_out"


def test_an_opt_out_made_elsewhere_offers_no_undo(site: Site) -> None:
    eve = site.person("eve@example.com")
    site.cm("recipient opt-out eve@example.com --reason asked")
    done = call(site.link(unsubscribe_token(eve)), b"via=web")
    assert done.status == 200 and "Undo" not in done.page and "<form" not in done.page
    assert [event[1] for event in events(site.url, eve)] == ["cm recipient opt-out"]


@pytest.mark.parametrize(("minutes", "works"), [(59, True), (61, False)])
def test_undo_expires_after_an_hour(site: Site, minutes: int, works: bool) -> None:
    fay = site.person("fay@example.com")
    assert one_click(site.link(unsubscribe_token(fay))).status == 200
    issued = datetime.now(UTC) - timedelta(minutes=minutes)
    token = make_token(SECRET.encode(), Purpose.UNDO, fay, latest_event_id(site.url, fay), issued)
    answer = call(f"{site.server.url}/undo/{token}", b"")
    assert answer.status == (200 if works else 400)
    assert_private(answer)
    assert status_of(site.url, fay) == ("active" if works else "opted_out")


def _tampered(token: str) -> str:
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


def test_bad_tampered_and_foreign_tokens_get_a_400_page_with_a_way_out(site: Site) -> None:
    gus = site.person("gus@example.com")
    key = SECRET.encode()
    wrong = {
        "tampered": _tampered(unsubscribe_token(gus)),
        "foreign": unsubscribe_token(gus, secret=FOREIGN),
        "confirm": make_token(key, Purpose.CONFIRM, gus, 7),
        "undo": make_token(key, Purpose.UNDO, gus, 7),
        "malformed": "not-a-token",
        "slashed": unsubscribe_token(gus)[:20] + "/" + unsubscribe_token(gus)[21:],
    }
    for name, token in wrong.items():
        for data in (None, ONE_CLICK, b"via=web"):
            answer = call(site.link(token), data)
            assert answer.status == 400, (name, data)
            assert_private(answer)
            assert "This link does not work" in answer.page
            assert 'href="mailto:unsub@example.com?subject=unsubscribe"' in answer.page
            assert token not in answer.page
    # On the undo path, the link tokens and the other purposes are refused alike.
    for token in (
        unsubscribe_token(gus),
        make_token(key, Purpose.TEST, gus, 7),
        make_token(key, Purpose.CONFIRM, gus, 7),
    ):
        answer = call(f"{site.server.url}/undo/{token}", b"")
        assert answer.status == 400 and "unsub@example.com" in answer.page
    assert status_of(site.url, gus) == "active" and events(site.url, gus) == []
    log = site.server.stderr()
    assert all(token not in log for token in wrong.values())


def test_a_test_token_shows_the_pages_and_changes_nothing(site: Site) -> None:
    hal = site.person("hal@example.com")
    link = site.link(make_token(SECRET.encode(), Purpose.TEST, hal, 7))
    page = call(link)
    assert page.status == 200 and "from a test message" in page.page and ">Unsubscribe</button>" in page.page
    for data in (ONE_CLICK, b"via=web"):
        done = call(link, data)
        assert done.status == 200 and "nothing was changed" in done.page and "Undo" not in done.page
    assert status_of(site.url, hal) == "active" and events(site.url, hal) == []


def test_a_forgotten_persons_tokens_find_nothing_to_do(site: Site) -> None:
    """Neither the link nor an undo made before `forget` brings the person back (test_consent_paths' rule for a
    reactivation path, given a forgotten address)."""
    ivy = site.person("ivy@example.com")
    link = site.link(unsubscribe_token(ivy))
    undo = undo_link(call(link, b"via=web").page, link)
    site.cm("recipient forget ivy@example.com")
    for url, data in ((link, None), (link, ONE_CLICK), (link, b"via=web"), (undo, b"")):
        answer = call(url, data)
        assert answer.status == 200 and "Nothing to do" in answer.page
        assert_private(answer)
    with db.get_engine(site.url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM recipient")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM suppression")).scalar_one() == 1
        actions = conn.execute(sa.text("SELECT action FROM consent_event ORDER BY id")).scalars().all()
    assert actions == ["opt_out", "forget"]


ROTATED = f"""
[send]
from = "news@example.com"
[unsubscribe]
secret = "{SECRET}"
old_secrets = ["{OLD}"]
"""


def test_old_secrets_check_but_never_sign(db_url: str, serve_factory: Callable[..., ServeProcess]) -> None:
    server = serve_factory(db_url, config=ROTATED)
    cm = make_cm(db_url)
    jo = int(cm("recipient create jo@example.com --json").json()["id"])
    kim = int(cm("recipient create kim@example.com --json").json()["id"])
    link = f"{server.url}/u/{unsubscribe_token(jo, secret=OLD)}"
    page = call(link)
    assert page.status == 200 and "news@example.com" in page.page  # the From has no name: its address
    done = call(link, b"via=web")
    assert done.status == 200 and status_of(db_url, jo) == "opted_out"
    undo_token = undo_link(done.page, link).rsplit("/", 1)[1]
    assert read_token(undo_token, Purpose.UNDO, [SECRET.encode()]).recipient_id == jo  # signed with the new one
    with pytest.raises(BadToken):
        read_token(undo_token, Purpose.UNDO, [OLD.encode()])
    # Another installation's token is refused; with no unsubscribe.mailto, the page says to reply.
    refused = one_click(f"{server.url}/u/{unsubscribe_token(kim, secret=FOREIGN)}")
    assert refused.status == 400 and "reply to any message from news@example.com asking to unsubscribe" in refused.page
    assert "mailto:" not in refused.page and status_of(db_url, kim) == "active"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('secret = "new"\nold_secrets = ["old", "", "new"]', [b"new", b"own", b"old"]),
        ('old_secrets = ["old"]', [b"own", b"old"]),
        ("", [b"own"]),
    ],
)
def test_signing_secrets_sign_with_the_first_and_check_with_old_ones_last(
    tmp_path: Path, table: str, expected: list[bytes]
) -> None:
    from campaign_manager.config import load_settings
    from campaign_manager.sending.ledger import signing_secrets

    (tmp_path / "campaign.toml").write_text(f"[unsubscribe]\n{table}\n", encoding="utf-8")
    assert signing_secrets(load_settings(), b"own") == expected


def test_a_sent_campaigns_link_unsubscribes(
    db_url: str, serve_factory: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    """End to end: the message's List-Unsubscribe URL, built on serve.base_url, POSTed as a provider does."""
    server = serve_factory(db_url)  # no secret configured: the database's own signs and checks
    (tmp_path / "campaign.toml").write_text(
        f'[send]\nfrom = "News Team <news@example.com>"\nrecord_interval = 0.05\n'
        f'[serve]\nbase_url = "{server.url}"\n[notifiers.outbox]\npath = "out"\n',
        encoding="utf-8",
    )
    cm = make_cm(db_url)
    cm("group create news")
    cm("group add-recipients news --email lea@example.com --email max@example.com")
    body = "Hello,\nnews.\nUnsubscribe: {{ unsubscribe_url }}\n"
    made = cm(["campaign", "create", "--title", "t", "--subject", "News", "--text", body, "--group", "news", "--json"])
    cid = int(made.json()["id"])
    cm(f"campaign send {cid} --notifier outbox --wait")
    messages = {}
    for file in (tmp_path / "out").iterdir():
        message = email.message_from_bytes(file.read_bytes())
        messages[message["To"]] = message
    assert set(messages) == {"lea@example.com", "max@example.com"}
    lea = messages["lea@example.com"]
    [url] = re.findall(r"<(http[^>]+)>", lea["List-Unsubscribe"])
    assert url.startswith(server.url + "/u/")
    assert url in lea.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "lea" not in url  # a token carries ids, never an address
    lea_id = int(cm("recipient show lea@example.com --json").json()["id"])
    found = read_token(url.rsplit("/", 1)[1], Purpose.UNSUBSCRIBE, _secrets(db_url))
    assert (found.recipient_id, found.ref_id) == (lea_id, cid)

    assert one_click(url).status == 200
    assert status_of(db_url, lea_id) == "opted_out"
    assert events(db_url, lea_id) == [("opt_out", "one-click", "127.0.0.1", f"campaign {cid}")]
    assert cm("recipient show max@example.com --json").json()["status"] == "active"


def _secrets(url: str) -> list[bytes]:
    from campaign_manager.sending.ledger import identity

    with db.open_session(url) as session:
        return [identity(session)[1]]
