"""`cm serve`'s sign-up with double opt-in, through a real `cm serve` process and the real worker code (the `outbox`
notifier writes the confirmation as an .eml file), on SQLite and PostgreSQL; and the `pending` state it brings to the
rest of cm (listings, counts, audiences, export, forget)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from campaign_manager import api, db
from campaign_manager.audience import consent, signups
from campaign_manager.audience.address_keys import email_hash
from campaign_manager.sending.tokens import Purpose, make_token
from conftest import Run, assert_error, make_cm
from serve_process import ServeProcess
from signup_helpers import SignupSite, answer, open_site, sign_up_and_confirm

Cm = Callable[..., Run]
Serve = Callable[..., ServeProcess]


def rows(url: str, query: str, **params: Any) -> list[Any]:
    with db.get_engine(url).connect() as conn:
        return list(conn.execute(sa.text(query), params).all())


def person(url: str, email: str) -> dict[str, Any] | None:
    """The recipient of an address (status, name, groups), its sign-ups and its consent events, straight from the
    database."""
    found = rows(url, "SELECT id, status, name FROM recipient WHERE email_key = :k", k=email.lower())
    events = rows(
        url,
        "SELECT action, source, client_ip FROM consent_event WHERE email_hash = :h ORDER BY id",
        h=email_hash(email.lower()),
    )
    if not found:
        return None if not events else {"status": None, "events": [tuple(e) for e in events]}
    rid, status, name = found[0]
    groups = rows(
        url,
        "SELECT g.name FROM group_member m JOIN recipient_group g ON g.id = m.group_id WHERE m.recipient_id = :r",
        r=rid,
    )
    signups = rows(url, "SELECT confirmed_at, client_key FROM signup WHERE recipient_id = :r", r=rid)
    return {
        "status": status,
        "name": name,
        "groups": sorted(g for (g,) in groups),
        "signups": len(signups),
        "events": [tuple(e) for e in events],
    }


def count(url: str, table: str) -> int:
    return int(rows(url, f"SELECT count(*) FROM {table}")[0][0])


@pytest.fixture
def site(db_url: str, tmp_path: Path, serve_factory: Serve) -> SignupSite:
    cm = make_cm(db_url)
    cm("group create news --description Monthly")
    cm("group update news --public")
    cm("group create staff")  # not public: never offered, never joined through the form
    return open_site(db_url, tmp_path / "site", serve_factory)


def group_id(url: str, name: str) -> str:
    return str(rows(url, "SELECT id FROM recipient_group WHERE name = :n", n=name)[0][0])


# -- the whole double opt-in ---------------------------------------------------------------------------------------


def test_sign_up_mails_a_link_whose_button_confirms(site: SignupSite, db_url: str) -> None:
    status, page = answer(site.server.url + "/subscribe")
    assert status == 200 and "news" in page and "Monthly" in page and "staff" not in page
    assert '<form method="post">' in page and "<script" not in page and 'name="website"' in page

    status, page = site.subscribe("Ada@Example.com", name="Ada Lovelace", group=group_id(db_url, "news"))
    assert status == 200 and "Check your inbox" in page
    assert person(db_url, "ada@example.com") == {
        "status": "pending",
        "name": None,  # the form's name waits for the confirmation
        "groups": [],
        "signups": 1,
        "events": [],
    }
    assert site.messages() == []  # nothing is sent inside the request: a job does it
    report = site.drain()
    assert list(report.outcomes.values()) == ["done"]
    [data] = site.messages()
    message = message_from_bytes(data, policy=policy.default)
    assert message["To"] == "Ada@example.com" and message["From"] == "News <news@example.com>"
    assert "News" in message["Subject"] and message["Auto-Submitted"] == "auto-generated"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "(news)" in text and "Ada Lovelace" not in text  # the form's free text never reaches the inbox
    [token] = site.links()

    status, page = site.confirm(token, post=False)
    assert status == 200 and "A***@example.com" in page and '<form method="post">' in page
    assert person(db_url, "ada@example.com")["status"] == "pending"  # type: ignore[index]  # GET changes nothing

    status, page = site.confirm(token, client="198.51.100.7")
    assert status == 200 and "You are signed up" in page
    assert person(db_url, "ada@example.com") == {
        "status": "active",
        "name": "Ada Lovelace",
        "groups": ["news"],
        "signups": 1,
        "events": [("opt_in", consent.CONFIRMED_SIGNUP, "198.51.100.7")],
    }
    # A link works once: pressed again, it changes nothing (nor would it undo a later opt-out).
    make_cm(db_url)("recipient opt-out ada@example.com")
    assert site.confirm(token)[0] == 200
    assert person(db_url, "ada@example.com")["status"] == "opted_out"  # type: ignore[index]
    exported = make_cm(db_url)("recipient export ada@example.com").json()
    assert exported["consent_history"][0]["client_ip"] == "198.51.100.7"
    assert [s["group"] for s in exported["signups"]] == ["news"] and exported["signups"][0]["confirmed_at"]


def test_bad_tampered_expired_and_foreign_links_are_a_plain_400(site: SignupSite, db_url: str) -> None:
    site.subscribe("ada@example.com")
    site.drain()
    [token] = site.links()
    tampered = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    secret = bytes.fromhex(rows(db_url, "SELECT value FROM cm_meta WHERE key = 'signing_secret'")[0][0])
    rid, sid = rows(db_url, "SELECT recipient_id, id FROM signup")[0]
    expired = make_token(secret, Purpose.CONFIRM, rid, sid, issued_at=datetime.now(UTC) - timedelta(days=8))
    foreign = make_token(secret, Purpose.UNSUBSCRIBE, rid, sid)  # signed, but for another purpose
    for bad in ("nonsense", tampered, expired, foreign):
        for post in (False, True):
            status, page = site.confirm(bad, post=post)
            assert status == 400 and "does not work" in page and "Traceback" not in page
    assert person(db_url, "ada@example.com")["status"] == "pending"  # type: ignore[index]
    assert site.confirm(token)[0] == 200  # the real one still works


# -- the answer tells nobody anything ----------------------------------------------------------------------------


def test_the_answer_is_the_same_for_new_known_and_forgotten_addresses(site: SignupSite, db_url: str) -> None:
    cm = make_cm(db_url)
    cm("recipient create known@example.com --name Known")
    cm("recipient opt-out out@example.com")
    cm("recipient create gone@example.com")
    cm("recipient forget gone@example.com")
    bodies = {email: site.subscribe(email) for email in ("new@example.com", "known@example.com", "gone@example.com")}
    bodies["out@example.com"] = site.subscribe("out@example.com")
    bodies["robot"] = site.subscribe("robot@example.com", name="x", website="http://spam.example")
    assert len(set(bodies.values())) == 1 and next(iter(bodies.values()))[0] == 200
    assert "example.com" not in bodies["robot"][1]  # no address echoed
    # The honeypot and the forgotten address left nothing; the others a sign-up each (and one confirmation each).
    assert person(db_url, "robot@example.com") is None
    assert person(db_url, "gone@example.com") == {"status": None, "events": [("forget", "cm recipient forget", None)]}
    assert count(db_url, "signup") == 3
    site.drain()
    assert len(site.messages()) == 3
    assert person(db_url, "known@example.com")["name"] == "Known"  # type: ignore[index]


def test_subscription_bombing_sends_one_confirmation(site: SignupSite, db_url: str) -> None:
    """20 sign-ups of one address at once, from 20 clients: one confirmation within 24 hours."""
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda n: site.subscribe("victim@example.com", client=f"203.0.113.{n}"), range(20)))
    assert {status for status, _ in answers} == {200}
    site.drain()
    assert len(site.messages()) == 1 and count(db_url, "signup") == 1


def test_a_client_over_its_rate_is_refused(db_url: str, tmp_path: Path, serve_factory: Serve) -> None:
    site = open_site(db_url, tmp_path / "site", serve_factory, rate=3)
    for n in range(3):
        assert site.subscribe(f"p{n}@example.com", client="203.0.113.9")[0] == 200
    status, page = site.subscribe("p3@example.com", client="203.0.113.9")
    assert status == 429 and "Too many" in page
    assert person(db_url, "p3@example.com") is None
    assert site.subscribe("p3@example.com", client="203.0.113.10")[0] == 200  # another client
    keys = {k for (k,) in rows(db_url, "SELECT client_key FROM signup")}
    assert len(keys) == 2 and not any("203.0.113" in key for key in keys)  # kept only as a keyed hash


def test_a_form_to_fix_says_why_and_records_nothing(site: SignupSite, db_url: str) -> None:
    for fields, why in (
        ({"email": "not-an-address"}, "not an email address"),
        ({"email": "a@example.com", "group": group_id(db_url, "staff")}, "choose one of the lists"),
        ({"email": "a@example.com", "group": "99999"}, "choose one of the lists"),
        ({"email": "a@example.com", "group": "staff"}, "choose one of the lists"),
        ({"email": "a@example.com", "name": "x" * 201}, "too long"),
    ):
        status, page = site.subscribe(**fields)
        assert status == 400 and why in page and 'value="' + fields["email"] + '"' in page
    assert count(db_url, "recipient") == 0 and count(db_url, "signup") == 0


# -- who the form may change ---------------------------------------------------------------------------------------


def test_nothing_of_a_known_person_changes_until_they_confirm(site: SignupSite, db_url: str) -> None:
    cm = make_cm(db_url)
    cm("recipient create ada@example.com --name Ada")
    site.subscribe("ada@example.com", name="Mallory", group=group_id(db_url, "news"))
    site.drain()
    assert person(db_url, "ada@example.com") == {
        "status": "active",
        "name": "Ada",
        "groups": [],
        "signups": 1,
        "events": [],
    }
    [token] = site.links()
    assert site.confirm(token)[0] == 200
    after = person(db_url, "ada@example.com")
    assert after is not None and (after["name"], after["groups"], after["events"]) == ("Mallory", ["news"], [])


def test_an_opted_out_person_who_confirms_is_active_again(site: SignupSite, db_url: str) -> None:
    make_cm(db_url)("recipient opt-out bob@example.com --reason moved")
    site.subscribe("bob@example.com")
    assert person(db_url, "bob@example.com")["status"] == "opted_out"  # type: ignore[index]  # until confirmed
    site.drain()
    [token] = site.links()
    assert site.confirm(token)[0] == 200
    after = person(db_url, "bob@example.com")
    assert after is not None and after["status"] == "active"
    assert after["events"][-1] == ("opt_in", consent.CONFIRMED_SIGNUP, "198.51.100.7")


def test_a_bounced_address_gets_no_confirmation(site: SignupSite, db_url: str) -> None:
    cm = make_cm(db_url)
    cm("recipient create b@example.com")
    with db.open_session(db_url) as session:
        consent.bounce(session, int(cm("recipient show b@example.com --json").json()["id"]), reason="5.1.1", source="t")
    site.subscribe("b@example.com")
    site.drain()
    assert site.messages() == [] and person(db_url, "b@example.com")["signups"] == 0  # type: ignore[index]


# -- what is kept, and for how long ------------------------------------------------------------------------------


def test_unconfirmed_sign_ups_are_deleted_after_confirm_days(site: SignupSite, db_url: str) -> None:
    site.subscribe("old@example.com")
    site.subscribe("kept@example.com")
    site.drain()  # both mailed; the worker's hourly purge ran, with nothing old enough yet
    sign_up_and_confirm(site, "done@example.com")
    long_ago = datetime.now(UTC) - timedelta(days=8)
    with db.get_engine(db_url).begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE signup SET created_at = :t WHERE recipient_id IN"
                " (SELECT id FROM recipient WHERE email_key IN ('old@example.com', 'done@example.com'))"
            ),
            {"t": long_ago},
        )
    site.subscribe("trigger@example.com")  # each sign-up purges a batch of expired ones
    assert person(db_url, "old@example.com") is None  # the pending recipient nobody confirmed: gone
    assert person(db_url, "done@example.com")["signups"] == 0  # type: ignore[index]  # confirmed: stays, active
    assert person(db_url, "done@example.com")["status"] == "active"  # type: ignore[index]
    assert person(db_url, "kept@example.com")["signups"] == 1  # type: ignore[index]


def test_the_worker_purges_them_too_and_skips_their_confirmation(
    db_url: str, tmp_path: Path, serve_factory: Serve
) -> None:
    site = open_site(db_url, tmp_path / "site", serve_factory)
    site.subscribe("old@example.com")
    with db.get_engine(db_url).begin() as conn:
        conn.execute(sa.text("UPDATE signup SET created_at = :t"), {"t": datetime.now(UTC) - timedelta(days=8)})
    report = site.drain()  # the housekeeping first, then the job: its sign-up is gone
    assert person(db_url, "old@example.com") is None and site.messages() == []
    with api.open_session(db_url, write=False) as session:
        [job_id] = report.outcomes
        assert api.get_job(session, job_id).counts == {"sent": 0, "skipped": 1}


def test_forget_clears_the_sign_up_and_the_client_address(site: SignupSite, db_url: str) -> None:
    cm = make_cm(db_url)
    site.subscribe("pending@example.com")
    sign_up_and_confirm(site, "confirmed@example.com")
    assert person(db_url, "confirmed@example.com")["events"][0][2] == "198.51.100.7"  # type: ignore[index]
    assert count(db_url, "signup") == 2
    cm("recipient forget pending@example.com")
    cm("recipient forget confirmed@example.com")
    assert count(db_url, "signup") == 0
    forgotten = ("forget", "cm recipient forget", None)
    assert person(db_url, "pending@example.com") == {"status": None, "events": [forgotten]}
    assert person(db_url, "confirmed@example.com") == {
        "status": None,
        "events": [("opt_in", consent.CONFIRMED_SIGNUP, None), forgotten],
    }
    assert rows(db_url, "SELECT count(*) FROM consent_event WHERE client_ip IS NOT NULL") == [(0,)]


# -- single opt-in, and a site not set up for double opt-in --------------------------------------------------------


def test_without_double_opt_in_the_form_makes_an_active_recipient(
    db_url: str, tmp_path: Path, serve_factory: Serve
) -> None:
    cm = make_cm(db_url)
    cm("group create news")
    cm("group update news --public")
    cm("recipient opt-out out@example.com")
    site = open_site(db_url, tmp_path / "site", serve_factory, double_opt_in=False)
    status, page = site.subscribe("ada@example.com", name="Ada", group="news", client="192.0.2.5")  # by name
    assert status == 200 and "Thank you" in page and "Check your inbox" not in page
    assert person(db_url, "ada@example.com") == {
        "status": "active",
        "name": "Ada",
        "groups": ["news"],
        "signups": 1,
        "events": [("opt_in", consent.WEB_SIGNUP, "192.0.2.5")],
    }
    assert site.subscribe("out@example.com")[1] == page  # an unverified form reactivates no one
    assert person(db_url, "out@example.com")["status"] == "opted_out"  # type: ignore[index]
    site.drain()
    assert site.messages() == []


def test_double_opt_in_without_a_base_url_is_a_503(db_url: str, tmp_path: Path, serve_factory: Serve) -> None:
    site = open_site(db_url, tmp_path / "site", serve_factory, base_url="")
    status, page = site.subscribe("ada@example.com")
    assert status == 503 and "not configured" in page
    assert count(db_url, "recipient") == 0
    site.server.stop()
    log = site.server.stderr()
    assert log.count("sign-up is not configured: serve.base_url is not set") == 1 and "Traceback" not in log


def test_a_refused_confirmation_fails_its_job_and_a_deferred_one_is_retried(
    db_url: str, tmp_path: Path, serve_factory: Serve, smtp_server: Any
) -> None:
    tables = f'[notifiers.email]\nhost = "{smtp_server.host}"\nport = {smtp_server.port}\ntls = "none"\n'
    site = open_site(db_url, tmp_path / "site", serve_factory, notifier="email", tables=tables)
    smtp_server.reply("RCPT", "550 5.1.1 no such user", to="nobody@example.com")
    smtp_server.reply("RCPT", "451 4.3.0 try later", to="later@example.com")
    site.subscribe("nobody@example.com")
    site.subscribe("later@example.com")
    site.subscribe("fine@example.com")
    report = api.drain(site.settings)
    with api.open_session(db_url, write=False) as session:
        jobs = {j.id: j for j in api.list_jobs(session)}
    failed, retried, done = (jobs[job_id] for job_id in sorted(report.outcomes))
    assert failed.status == "failed" and "5.1.1" in (failed.error or "") and "nobody" not in (failed.error or "")
    assert retried.status == "queued" and "451" in (retried.error or "") and report.waiting
    assert done.status == "done" and [m.rcpt for m in smtp_server.messages] == [["fine@example.com"]]
    assert "Confirm your sign-up" in smtp_server.messages[0].data.decode()


# -- pending everywhere else ---------------------------------------------------------------------------------------


def test_pending_recipients_are_listed_apart_and_never_counted_or_mailed(site: SignupSite, db_url: str) -> None:
    cm = make_cm(db_url)
    cm("recipient create ada@example.com --group news")
    site.subscribe("pending@example.com")
    cm("recipient update pending@example.com --add-group news")  # even in a group
    assert [r["email"] for r in cm("recipient list --pending --json").json()] == ["pending@example.com"]
    assert [r["email"] for r in cm("recipient list --active --json").json()] == ["ada@example.com"]
    assert len(cm("recipient list --json").json()) == 2
    news = next(g for g in cm("group list --json").json() if g["name"] == "news")
    assert (news["members"], news["active_members"], news["public"]) == (2, 1, True)
    assert "public" in cm("group list").stdout
    cid = cm("campaign create --title T --subject S --text Hi --group news --json").json()["id"]
    assert [c["audience"] for c in cm("campaign list --json").json()] == [1]
    site.drain()  # the confirmation
    api.submit_job(site.settings, lambda s: api.queue_send(s, site.settings, cid, notifier="outbox").job)
    site.drain()
    with api.open_session(db_url, write=False) as session:
        sent = {d["email"] for d in api.iter_deliveries(session, cid) if d["status"] == "sent"}
        assert api.campaign_stats(session, cid)["sent"] == 1
    assert sent == {"ada@example.com"}


def test_group_public_is_switched_on_and_off(cm: Cm) -> None:
    cm("group create news")
    assert cm("group show news --json").json()["public"] is False
    assert cm("group update news --public --json").json()["public"] is True
    assert cm("group update news --no-public --json").json()["public"] is False
    assert cm("group update news --name news2 --json").json()["public"] is False  # unchanged when not given


def test_each_status_lists_only_its_own(cm: Cm, db_url: str) -> None:
    cm("recipient create a@example.com")
    cm("recipient create b@example.com")
    cm("recipient opt-out o@example.com")
    with db.open_session(db_url) as session:
        consent.bounce(session, int(cm("recipient show b@example.com --json").json()["id"]), reason="5.1.1", source="t")
        form = signups.Form("p@example.com")
        signups.sign_up(session, form, double_opt_in=True, rate=0, client="k", client_ip=None)
    for flag, email in (("active", "a"), ("opted-out", "o"), ("bounced", "b"), ("pending", "p")):
        assert [r["email"] for r in cm(f"recipient list --{flag} --json").json()] == [f"{email}@example.com"]
    assert_error(cm("recipient list --pending --bounced", ok=False), 2, "exclude each other")
