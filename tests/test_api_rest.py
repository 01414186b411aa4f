"""The REST API of `cm serve`, in-process over a real database (SQLite and PostgreSQL) and a real queue drained by the
real worker code: the token, keyset paging, every route's answers and error bodies, queued calls (202 with the job),
and pages of the 260,000-recipient database answering at once however deep."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

import bigdb
from campaign_manager import api, db
from campaign_manager.config import Settings
from campaign_manager.serve.app import create_app

with warnings.catch_warnings():  # starlette asks for httpx2, which the dev extra does not pin yet
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "s3cret-token"


@dataclass
class Api:
    client: TestClient
    settings: Settings

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        if isinstance(body, str):  # JSON as written (one no JSON encoder here would write)
            return self.client.post(path, content=body, headers={"Content-Type": "application/json"}, **kwargs)
        return self.client.post(path, json=body, **kwargs)

    def patch(self, path: str, body: Any) -> Any:
        return self.client.patch(path, json=body)

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with db.get_engine(self.settings.database_url).connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]


def make_api(url: str, token: str | None = TOKEN, **flags: Any) -> Api:
    settings = api.load_settings(None, {"database.url": url, "serve.api_token": token, **flags})
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"} if token else {})
    return Api(client, settings)


@pytest.fixture
def rest(db_url: str) -> Iterator[Api]:
    made = make_api(db_url)
    with made.client:
        yield made


def problem(answer: Any, status: int, code: str, *fragments: str) -> dict[str, Any]:
    """An error as every route gives it: the status, `{"detail", "code"}` and nothing else."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"detail", "code"} and body["code"] == code, body
    for fragment in fragments:
        assert fragment.lower() in body["detail"].lower(), body
    return dict(body)


def ok(answer: Any, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json()


# ---------------------------------------------------------------------------------------------------- the token


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/recipients/", None), ("POST", "/groups/", {"name": 12}), ("GET", "/jobs/999", None)],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer ", f"bearer {TOKEN}x"])
def test_a_request_without_the_token_is_401_before_anything_else(
    sqlite_url: str, method: str, path: str, body: Any, authorization: str | None
) -> None:
    client = make_api(sqlite_url).client
    headers = {} if authorization is None else {"Authorization": authorization}
    client.headers.pop("Authorization")
    answer = client.request(method, path, json=body, headers=headers)  # an invalid body is not even read
    problem(answer, 401, "unauthorized")
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_token_opens_every_route_and_the_scheme_is_case_insensitive(sqlite_url: str) -> None:
    client = make_api(sqlite_url).client
    assert client.get("/recipients/", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_no_token_configured_means_no_api(sqlite_url: str) -> None:
    client = make_api(sqlite_url, token=None).client
    for path in ("/recipients/", "/groups/", "/campaigns/", "/jobs/", "/openapi.json", "/docs"):
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404, path


# ---------------------------------------------------------------------------------------------------- paging


def _people(rest: Api, n: int) -> list[int]:
    return [ok(rest.post("/recipients/", {"email": f"p{i}@example.com"}), 201)["id"] for i in range(n)]


def _walk(rest: Api, path: str) -> tuple[list[int], int]:
    """Every id of a listing, following its Link headers; and how many pages it took."""
    ids: list[int] = []
    pages = 0
    url: str | None = path
    while url is not None:
        answer = rest.get(url)
        page = ok(answer)
        assert isinstance(page, list)
        ids += [item.get("id", item.get("delivery_id")) for item in page]
        pages += 1
        url = answer.links.get("next", {}).get("url")
    return ids, pages


def test_pages_follow_the_keys_and_link_to_the_next(rest: Api) -> None:
    ids = _people(rest, 7)
    answer = rest.get("/recipients/?limit=3")
    assert [r["id"] for r in ok(answer)] == ids[:3]
    assert answer.headers["Link"] == f'<http://testserver/recipients/?limit=3&after={ids[2]}>; rel="next"'
    assert [r["id"] for r in ok(rest.get(f"/recipients/?limit=3&after={ids[2]}"))] == ids[3:6]
    last = rest.get(f"/recipients/?limit=3&after={ids[5]}")
    assert [r["id"] for r in ok(last)] == ids[6:] and "Link" not in last.headers
    full = rest.get("/recipients/?limit=7")  # exactly the rest: no link to an empty page
    assert len(ok(full)) == 7 and "Link" not in full.headers
    assert _walk(rest, "/recipients/?limit=2") == (ids, 4)
    assert len(ok(rest.get("/recipients/"))) == 7  # default limit 100


@pytest.mark.parametrize(
    "query", ["limit=1001", "limit=0", "limit=-5", "limit=ten", "after=-1", "after=99999999999999999999"]
)
def test_out_of_range_paging_is_422(rest: Api, query: str) -> None:
    problem(rest.get(f"/recipients/?{query}"), 422, "invalid_input", "query.")


def test_at_most_a_thousand_a_page(rest: Api) -> None:
    assert ok(rest.get("/recipients/?limit=1000")) == []


def test_links_use_serve_base_url_and_keep_the_filters(sqlite_url: str) -> None:
    rest = make_api(sqlite_url, **{"serve.base_url": "https://lists.example.com/"})
    group = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    ok(rest.patch(f"/groups/{group}/recipients", {"recipient_emails": ["a@example.com", "b@example.com"]}))
    answer = rest.get(f"/groups/{group}/recipients?active=true&limit=1")
    assert answer.headers["Link"] == (
        f'<https://lists.example.com/groups/{group}/recipients?active=true&limit=1&after=1>; rel="next"'
    )


# ---------------------------------------------------------------------------------------------------- recipients


def test_recipients_are_created_shown_and_listed(rest: Api) -> None:
    group = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    made = ok(
        rest.post(
            "/recipients/",
            {
                "email": "Ada@Example.com",
                "name": "Ada",
                "phone": "+44 20",
                "attributes": {"city": "London"},
                "group_id": group,
            },
        ),
        201,
    )
    assert made["email"] == "Ada@example.com" and made["status"] == "active" and made["groups"] == ["news"]
    assert made["attributes"] == {"city": "London"} and made["created_at"].endswith("Z")
    assert ok(rest.get(f"/recipients/{made['id']}")) == made
    assert ok(rest.get("/recipients/")) == [made] == ok(rest.get("/recipients/active"))
    problem(rest.get("/recipients/999"), 404, "not_found", "no recipient")
    problem(rest.get("/recipients/abc"), 422, "invalid_input", "path.recipient_id")


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        ({"email": "ada@example.com"}, 409, "conflict", "already exists"),
        ({"email": "ADA@example.com"}, 409, "conflict", "already exists"),
        ({"email": "out@example.com"}, 409, "consent", "opted out"),
        ({"email": "gone@example.com"}, 409, "consent", "forgotten"),
        ({"email": "new@example.com", "group_id": 999}, 404, "not_found", "no group"),
        ({"email": "a@b"}, 400, "invalid_input", "email"),
        ({"email": "new@example.com", "phone": "call me"}, 400, "invalid_input", "phone"),
        ({"email": "no-at-sign"}, 422, "invalid_input", "body.email"),
        ({"email": "new@example.com", "name": "x" * 201}, 422, "invalid_input", "body.name"),
        ({"email": "new@example.com", "attributes": {"k": "v" * 1001}}, 422, "invalid_input", "attributes"),
        ('{"email": "new@example.com", "name": "\\ud800"}', 422, "invalid_input", "body.name"),  # not Unicode
        ({"email": "new@example.com", "nmae": "typo"}, 422, "invalid_input", "body.nmae"),
        ({}, 422, "invalid_input", "body.email"),
    ],
)
def test_a_refused_create_says_why(
    rest: Api, body: dict[str, Any] | str, status: int, code: str, fragment: str
) -> None:
    ok(rest.post("/recipients/", {"email": "ada@example.com"}), 201)
    ok(rest.post("/recipients/opt-out", {"email": "out@example.com"}))
    with api.open_session(rest.settings.database_url) as session:
        api.forget_recipient(session, "gone@example.com", source="test")
    before = rest.rows("SELECT id, status FROM recipient ORDER BY id")
    problem(rest.post("/recipients/", body), status, code, fragment)
    assert rest.rows("SELECT id, status FROM recipient ORDER BY id") == before


def test_patch_changes_what_is_given(rest: Api) -> None:
    news = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    vip = ok(rest.post("/groups/", {"name": "vip"}), 201)["id"]
    rid = ok(rest.post("/recipients/", {"email": "ada@example.com", "name": "Ada", "groups": [news]}), 201)["id"]
    changed = ok(rest.patch(f"/recipients/{rid}", {"name": "Ada King", "group_id": vip, "attributes": {"plan": "pro"}}))
    assert changed["name"] == "Ada King" and changed["groups"] == ["news", "vip"]
    changed = ok(rest.patch(f"/recipients/{rid}", {"remove_groups": [news], "attributes": {"plan": ""}, "name": ""}))
    assert changed["groups"] == ["vip"] and changed["attributes"] == {} and changed["name"] is None
    assert ok(rest.patch(f"/recipients/{rid}", {"opt_out": False}))["status"] == "active"  # nothing to change
    problem(rest.patch(f"/recipients/{rid}", {"add_groups": [999]}), 404, "not_found", "no group")
    problem(rest.patch("/recipients/999", {"name": "x"}), 404, "not_found")
    problem(rest.patch(f"/recipients/{rid}", {"reason": "why"}), 400, "invalid_input", "opt_out")
    problem(rest.patch(f"/recipients/{rid}", {"opt_out": "maybe"}), 422, "invalid_input", "body.opt_out")


def test_patch_opts_out_through_consent_and_never_opts_in(rest: Api) -> None:
    rid = ok(rest.post("/recipients/", {"email": "bob@example.com"}), 201)["id"]
    out = ok(rest.patch(f"/recipients/{rid}", {"opt_out": True, "reason": "asked by phone"}))
    assert out["status"] == "opted_out" and out["opt_out_reason"] == "asked by phone"
    refused = problem(
        rest.patch(f"/recipients/{rid}", {"opt_out": False, "name": "Bob"}), 409, "consent", "POST /recipients/opt-in"
    )
    assert "opted out" in refused["detail"]
    assert rest.rows("SELECT status, name FROM recipient") == [("opted_out", None)]  # nothing of it applied
    assert ok(rest.patch(f"/recipients/{rid}", {"name": "Bob"}))["status"] == "opted_out"
    assert rest.rows("SELECT action, source, reason FROM consent_event ORDER BY id") == [
        ("opt_out", "api", "asked by phone")
    ]


def test_opt_out_and_opt_in_by_address(rest: Api) -> None:
    out = ok(rest.post("/recipients/opt-out", {"email": "New@Example.com", "reason": "No longer interested"}))
    assert out["status"] == "opted_out" and out["email"] == "New@example.com"  # recorded, though never created
    again = ok(rest.post("/recipients/opt-out", {"email": "new@example.com"}))
    assert again["id"] == out["id"] and again["opt_out_reason"] == "No longer interested"  # already out: unchanged
    assert (
        ok(rest.post("/recipients/opt-in", {"email": "new@example.com", "reason": "came back"}))["status"] == "active"
    )
    assert ok(rest.post("/recipients/opt-in", {"email": "new@example.com"}))["status"] == "active"
    problem(rest.post("/recipients/opt-in", {"email": "never@example.com"}), 404, "not_found")
    problem(rest.post("/recipients/opt-in", {"email": "123"}), 422, "invalid_input", "body.email")
    problem(rest.post("/recipients/opt-out", {"email": "x@example.com", "reason": "r" * 501}), 422, "invalid_input")
    assert rest.rows("SELECT action, source FROM consent_event ORDER BY id") == [("opt_out", "api"), ("opt_in", "api")]


def test_a_forgotten_address_cannot_be_opted_out_but_opts_in(rest: Api) -> None:
    with api.open_session(rest.settings.database_url) as session:
        api.forget_recipient(session, "gone@example.com", source="test")
    problem(rest.post("/recipients/opt-out", {"email": "gone@example.com"}), 409, "consent", "forgotten")
    back = ok(rest.post("/recipients/opt-in", {"email": "gone@example.com"}))
    assert back["status"] == "active" and back["name"] is None


def test_only_mailable_recipients_are_active(rest: Api) -> None:
    ids = _people(rest, 5)
    ok(rest.post("/recipients/opt-out", {"email": "p1@example.com"}))
    with db.get_engine(rest.settings.database_url).begin() as conn:  # signed up on the web, not confirmed
        conn.execute(sa.text("UPDATE recipient SET status = 'pending' WHERE id = :i"), {"i": ids[2]})
        conn.execute(sa.text("UPDATE recipient SET status = 'bounced' WHERE id = :i"), {"i": ids[3]})
    assert [r["id"] for r in ok(rest.get("/recipients/active"))] == [ids[0], ids[4]]
    assert _walk(rest, "/recipients/active?limit=1") == ([ids[0], ids[4]], 2)
    assert [r["status"] for r in ok(rest.get("/recipients/"))] == [
        "active",
        "opted_out",
        "pending",
        "bounced",
        "active",
    ]


# ---------------------------------------------------------------------------------------------------- groups


def test_groups(rest: Api) -> None:
    made = ok(rest.post("/groups/", {"name": "VIP Customers", "description": "High-value customers"}), 201)
    assert made == {**made, "name": "VIP Customers", "members": 0, "active_members": 0}
    problem(rest.post("/groups/", {"name": "vip customers"}), 409, "conflict", "already exists")
    problem(rest.post("/groups/", {"name": "2024"}), 400, "invalid_input", "all digits")
    problem(rest.post("/groups/", {"name": ""}), 422, "invalid_input", "body.name")
    problem(rest.post("/groups/", {"name": "g" * 201}), 422, "invalid_input", "body.name")
    other = ok(rest.post("/groups/", {"name": "other"}), 201)
    changed = ok(rest.patch(f"/groups/{made['id']}", {"name": "Updated VIP Customers", "description": ""}))
    assert changed["name"] == "Updated VIP Customers" and changed["description"] is None
    problem(rest.patch(f"/groups/{made['id']}", {"name": "OTHER"}), 409, "conflict")
    problem(rest.patch("/groups/999", {"name": "x"}), 404, "not_found", "no group")
    problem(rest.get("/groups/999"), 404, "not_found", "no group")
    assert ok(rest.get(f"/groups/{other['id']}")) == other
    assert [g["id"] for g in ok(rest.get("/groups/"))] == [made["id"], other["id"]]
    assert _walk(rest, "/groups/?limit=1") == ([made["id"], other["id"]], 2)
    problem(rest.get("/groups/999/recipients"), 404, "not_found")


def test_adding_addresses_reports_each_and_keeps_consent(rest: Api) -> None:
    group = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    ok(rest.post("/recipients/", {"email": "old@example.com"}), 201)
    ok(rest.post("/recipients/opt-out", {"email": "out@example.com"}))
    emails = ["new@example.com", "old@example.com", "NEW@example.com", "not-an-address", "out@example.com"]
    report = ok(rest.patch(f"/groups/{group}/recipients", {"recipient_emails": emails}))
    assert [(r["input"], r["outcome"]) for r in report] == [
        ("new@example.com", "created"),
        ("old@example.com", "added"),
        ("NEW@example.com", "duplicate"),
        ("not-an-address", "invalid"),
        ("out@example.com", "suppressed"),
    ]
    assert report[3]["reason"] and report[4]["reason"] == "opted out"
    again = ok(rest.patch(f"/groups/{group}/recipients", {"recipient_emails": ["old@example.com"]}))
    assert again[0]["outcome"] == "already_member"
    members = ok(rest.get(f"/groups/{group}/recipients"))
    assert [m["email"] for m in members] == ["old@example.com", "new@example.com"]
    assert rest.rows("SELECT status FROM recipient WHERE email_key = 'out@example.com'") == [("opted_out",)]
    ok(rest.post("/recipients/opt-out", {"email": "new@example.com"}))
    assert [m["email"] for m in ok(rest.get(f"/groups/{group}/recipients?active=true"))] == ["old@example.com"]
    assert ok(rest.get(f"/groups/{group}")) == {**ok(rest.get(f"/groups/{group}")), "members": 2, "active_members": 1}
    problem(rest.patch("/groups/999/recipients", {"recipient_emails": ["a@example.com"]}), 404, "not_found")


def test_too_many_addresses_are_refused_whole_with_the_way_to_import(rest: Api) -> None:
    group = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    emails = [f"p{i}@example.com" for i in range(10_001)]
    at_once = rest.patch(f"/groups/{group}/recipients", {"recipient_emails": emails[:1_001]})
    problem(at_once, 422, "invalid_input", "at most 1,000 addresses", "POST /imports")
    queued = rest.post("/campaigns/", {"title": "T", "message": "M", "recipient_emails": emails})
    problem(queued, 422, "invalid_input", "at most 10,000 addresses", "POST /imports")
    too_long = rest.patch(f"/groups/{group}/recipients", {"recipient_emails": ["x" * 321 + "@example.com"]})
    problem(too_long, 422, "invalid_input", "recipient_emails.0")
    assert rest.rows("SELECT count(*) FROM recipient") == [(0,)]
    assert rest.rows("SELECT count(*) FROM campaign") == [(0,)]
    assert len(ok(rest.patch(f"/groups/{group}/recipients", {"recipient_emails": emails[:1_000]}))) == 1_000


# ---------------------------------------------------------------------------------------------------- campaigns


def test_a_campaign_without_addresses_is_created_at_once(rest: Api) -> None:
    group = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    ok(rest.patch(f"/groups/{group}/recipients", {"recipient_emails": ["a@example.com", "b@example.com"]}))
    made = ok(rest.post("/campaigns/", {"title": "May", "message": "Hi {{ name }}", "group_ids": [group]}), 201)
    assert made["job"] is None and made["status"] == "draft" and made["subject"] == "May"
    assert made["groups"] == ["news"] and made["audience"] == 2
    detail = ok(rest.get(f"/campaigns/{made['id']}"))
    assert detail["text"] == "Hi {{ name }}" and detail["html"] is None and detail["from"] is None
    assert ok(rest.get("/campaigns/")) == [{k: v for k, v in made.items() if k != "job"}]
    problem(rest.post("/campaigns/", {"title": "T", "message": "{{ broken"}), 400, "invalid_input")
    problem(rest.post("/campaigns/", {"title": "T", "message": "M", "group_ids": [999]}), 404, "not_found")
    problem(rest.post("/campaigns/", {"title": "T", "message": ""}), 422, "invalid_input", "body.message")
    nul = {"title": "T", "message": "M", "recipient_emails": ["a@example.com", "b\x00@example.com"]}
    problem(rest.post("/campaigns/", nul), 422, "invalid_input", "recipient_emails.1", "NUL")
    problem(rest.get("/campaigns/999"), 404, "not_found", "no campaign")
    assert rest.rows("SELECT count(*) FROM campaign") == [(1,)]


def test_a_campaign_with_addresses_is_202_and_its_job_imports_them(rest: Api) -> None:
    ok(rest.post("/recipients/opt-out", {"email": "out@example.com"}))
    body = {
        "title": "Welcome Campaign",
        "message": "Welcome to our platform!",
        "subject": "Welcome, {{ name or 'friend' }}",
        "from": "news@example.com",
        "recipient_emails": ["user1@example.com", "user2@example.com", "USER1@example.com", "out@example.com", "bad"],
    }
    answer = rest.post("/campaigns/", body)
    made = ok(answer, 202)
    assert made["job"]["status"] == "queued" and made["job"]["kind"] == "import" and made["audience"] == 0
    assert api.drain(rest.settings).ok
    job = ok(rest.get(f"/jobs/{made['job']['id']}"))
    assert job["status"] == "done"
    assert {k: job["counts"][k] for k in ("created", "added", "duplicates", "suppressed", "invalid")} == {
        "created": 2,
        "added": 2,
        "duplicates": 1,
        "suppressed": 1,
        "invalid": 1,
    }
    assert [(r["line"], r["row"]) for r in ok(rest.get(f"/jobs/{made['job']['id']}/rejects"))] == [(6, "bad")]
    shown = ok(rest.get(f"/campaigns/{made['id']}"))
    assert shown["audience"] == 2 and shown["from"] == "news@example.com" and shown["subject"] == body["subject"]
    assert rest.rows("SELECT status FROM recipient WHERE email_key = 'out@example.com'") == [("opted_out",)]


def test_sending_is_queued_and_the_ledger_is_readable(rest: Api, db_url: str) -> None:
    group = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    emails = [f"p{i}@example.com" for i in range(5)]
    ok(rest.patch(f"/groups/{group}/recipients", {"recipient_emails": emails}))
    ok(rest.post("/recipients/opt-out", {"email": "p4@example.com"}))
    cid = ok(rest.post("/campaigns/", {"title": "T", "message": "Hi", "group_ids": [group]}), 201)["id"]
    # No notifier configured: the server's to fix, 503 `config`; nothing changed.
    problem(rest.post("/campaigns/send", {"campaign_id": cid}), 503, "config", "no notifier")
    assert ok(rest.get(f"/campaigns/{cid}"))["status"] == "draft"
    problem(rest.post("/campaigns/send", {"campaign_id": 999, "notifier": "outbox"}), 404, "not_found")
    problem(rest.post("/campaigns/send", {"campaign_id": cid, "notifier": "nope"}), 503, "config", "no notifier 'nope'")
    problem(rest.post("/campaigns/send", {"campaign_id": cid, "rate": 0}), 422, "invalid_input", "body.rate")
    problem(
        rest.post("/campaigns/send", {"campaign_id": cid, "at": "2030-01-01T09:00"}), 422, "invalid_input", "body.at"
    )
    problem(rest.post("/campaigns/send", {"campaign_id": "x"}), 422, "invalid_input", "body.campaign_id")
    for at in ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-05:00"):  # no such time in UTC
        problem(rest.post("/campaigns/send", {"campaign_id": cid, "at": at}), 422, "invalid_input", "out of range")
    problem(rest.post("/campaigns/send", {"campaign_id": 2**31}), 422, "invalid_input", "body.campaign_id")

    sender = make_api(db_url, **{"send.notifier": "outbox", "send.from": "News <news@example.com>"})
    answer = sender.post("/campaigns/send", {"campaign_id": cid, "rate": 50})
    queued = ok(answer, 202)
    assert queued["job"]["kind"] == "send" and "warning" in queued["message"]  # no {{ unsubscribe_url }} in it
    assert answer.headers["Location"] == f"/jobs/{queued['job']['id']}"
    assert api.drain(sender.settings).ok
    stats = ok(sender.get(f"/campaigns/{cid}/stats"))
    assert (stats["status"], stats["total"], stats["sent"], stats["skipped"]) == ("sent", 5, 4, 1)
    sent_ids, pages = _walk(sender, f"/campaigns/{cid}/deliveries?status=sent&limit=3")
    assert len(sent_ids) == 4 and pages == 2
    skipped = ok(sender.get(f"/campaigns/{cid}/deliveries?status=skipped"))
    assert [(d["email"], d["error"]) for d in skipped] == [("p4@example.com", "opted out")]
    problem(sender.get(f"/campaigns/{cid}/deliveries?status=lost"), 422, "invalid_input", "query.status")
    problem(sender.get("/campaigns/999/stats"), 404, "not_found")
    problem(sender.get("/campaigns/999/deliveries"), 404, "not_found")
    again = ok(sender.post("/campaigns/send", {"campaign_id": cid}), 200)  # sent: nothing new, nothing queued
    assert again["job"] is None and "nothing new" in again["message"]
    other = ok(sender.post("/campaigns/", {"title": "U", "message": "Hi", "group_ids": [group]}), 201)["id"]
    api.cancel(db_url, other)
    problem(sender.post("/campaigns/send", {"campaign_id": other}), 409, "conflict", "cancelled")


def test_a_send_at_a_later_time_is_scheduled(rest: Api, db_url: str) -> None:
    sender = make_api(db_url, **{"send.notifier": "outbox", "send.from": "news@example.com"})
    cid = ok(sender.post("/campaigns/", {"title": "T", "message": "Hi {{ unsubscribe_url }}"}), 201)["id"]
    queued = ok(sender.post("/campaigns/send", {"campaign_id": cid, "at": "2099-01-01T09:00:00+01:00"}), 202)
    assert "warning" not in queued["message"]
    assert ok(sender.get(f"/campaigns/{cid}/stats"))["scheduled_at"].startswith("2099-01-01T08:00:00")
    assert ok(sender.get(f"/jobs/{queued['job']['id']}"))["status"] == "queued"


# ---------------------------------------------------------------------------------------------------- jobs, imports


def test_an_upload_is_queued_and_its_bad_row_reported(rest: Api) -> None:
    group = ok(rest.post("/groups/", {"name": "news"}), 201)["id"]
    csv_text = b"Email Address;Full Name;city\nada@example.com;Ada;London\nnot-an-address;Bad;X\nbob@example.com;Bob;\n"
    answer = rest.client.post("/imports", files={"file": ("people.csv", csv_text, "text/csv")}, data={"group": "news"})
    job = ok(answer, 202)
    assert job["kind"] == "import" and job["status"] == "queued" and job["args"]["source"] == "people.csv"
    assert answer.headers["Location"] == f"/jobs/{job['id']}"
    assert api.drain(rest.settings).ok
    done = ok(rest.get(f"/jobs/{job['id']}"))
    assert done["status"] == "done" and done["counts"]["created"] == 2 and done["counts"]["invalid"] == 1
    rejects = ok(rest.get(f"/jobs/{job['id']}/rejects"))
    assert len(rejects) == 1 and rejects[0]["line"] == 3 and rejects[0]["row"] == "not-an-address;Bad;X"
    assert "@" in rejects[0]["reason"]
    members = ok(rest.get(f"/groups/{group}/recipients"))
    assert [(m["email"], m["name"], m["attributes"]) for m in members] == [
        ("ada@example.com", "Ada", {"city": "London"}),
        ("bob@example.com", "Bob", {}),
    ]
    assert [j["id"] for j in ok(rest.get("/jobs/?status=done"))] == [job["id"]]
    assert ok(rest.get("/jobs/?status=queued")) == []


def test_an_upload_into_a_campaign(rest: Api) -> None:
    cid = ok(rest.post("/campaigns/", {"title": "T", "message": "Hi"}), 201)["id"]
    files = {"file": ("list.csv", b"email\nada@example.com\n")}
    job = ok(rest.client.post("/imports", files=files, data={"campaign_id": str(cid)}), 202)
    assert job["args"]["target"] == {"type": "campaign", "id": cid}
    assert api.drain(rest.settings).ok
    assert ok(rest.get(f"/campaigns/{cid}"))["audience"] == 1


@pytest.mark.parametrize(
    ("data", "content", "status", "code", "fragment"),
    [
        ({}, b"email\na@example.com\n", 400, "invalid_input", "exactly one group or campaign"),
        ({"group": "news", "campaign_id": "1"}, b"email\na@example.com\n", 400, "invalid_input", "exactly one"),
        ({"group": "nowhere"}, b"email\na@example.com\n", 404, "not_found", "no group"),
        ({"campaign_id": "999"}, b"email\na@example.com\n", 404, "not_found", "no campaign"),
        ({"group": "news"}, b"name,city\nAda,London\n", 400, "invalid_input", "email column"),
        ({"group": "news"}, b"email\x00\x01\x02\n\x00\x00", 400, "invalid_input", "binary"),
        ({"group": "news"}, b"", 400, "invalid_input", "empty"),
        ({"group": "news", "encoding": "klingon"}, b"email\na@example.com\n", 400, "invalid_input", "encoding"),
        (
            {"group": "news", "encoding": "rot13"},
            b"email\na@example.com\n",
            400,
            "invalid_input",
            "not a text encoding",
        ),
        ({"group": "news", "campaign_id": "zero"}, b"email\n", 422, "invalid_input", "campaign_id"),
    ],
)
def test_an_upload_that_cannot_be_imported_queues_nothing(
    rest: Api, data: dict[str, str], content: bytes, status: int, code: str, fragment: str
) -> None:
    ok(rest.post("/groups/", {"name": "news"}), 201)
    problem(rest.client.post("/imports", files={"file": ("x.csv", content)}, data=data), status, code, fragment)
    assert rest.rows("SELECT count(*) FROM job") == [(0,)]


def test_a_missing_file_is_422(rest: Api) -> None:
    problem(rest.client.post("/imports", data={"group": "news"}), 422, "invalid_input", "body.file")


def test_jobs_errors(rest: Api) -> None:
    problem(rest.get("/jobs/999"), 404, "not_found", "no job")
    problem(rest.get("/jobs/999/rejects"), 404, "not_found")
    problem(rest.get("/jobs/?status=lost"), 422, "invalid_input", "query.status")
    sender = make_api(rest.settings.database_url, **{"send.notifier": "outbox", "send.from": "n@example.com"})
    cid = ok(sender.post("/campaigns/", {"title": "T", "message": "Hi"}), 201)["id"]
    job = ok(sender.post("/campaigns/send", {"campaign_id": cid}), 202)["job"]["id"]
    problem(rest.get(f"/jobs/{job}/rejects"), 400, "invalid_input", "only imports")


def test_an_unreachable_queue_is_503_and_leaves_no_job(sqlite_url: str) -> None:
    rest = make_api(sqlite_url, **{"queue.url": "redis://127.0.0.1:1/0"})
    ok(rest.post("/groups/", {"name": "news"}), 201)
    answer = rest.client.post("/imports", files={"file": ("x.csv", b"email\na@example.com\n")}, data={"group": "news"})
    problem(answer, 503, "queue", "cannot")
    answer = rest.post("/campaigns/", {"title": "T", "message": "M", "recipient_emails": ["a@example.com"]})
    problem(answer, 503, "queue")
    assert rest.rows("SELECT count(*) FROM job") == [(0,)] and rest.rows("SELECT count(*) FROM campaign") == [(0,)]


def test_an_unreachable_database_is_503(tmp_path: Any) -> None:
    rest = make_api(f"sqlite:///{tmp_path / 'missing.db'}")
    problem(rest.get("/recipients/"), 503, "database")
    problem(rest.post("/groups/", {"name": "news"}), 503, "database")


# ---------------------------------------------------------------------------------------------------- OpenAPI


def test_every_route_declares_its_errors_and_the_token(rest: Api) -> None:
    document = ok(rest.get("/openapi.json"))
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    routes = [(m, p, op) for p, ops in document["paths"].items() for m, op in ops.items()]
    assert len(routes) >= 23
    for method, path, operation in routes:
        responses = operation["responses"]
        assert operation["security"] == [{"HTTPBearer": []}], (method, path)
        for status in ("401", "422", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Problem"
            }, (method, path, status)
        if "{" in path:
            assert "404" in responses, (method, path)
        success = [s for s in responses if s.startswith("2")]
        assert success and all("schema" in responses[s]["content"]["application/json"] for s in success)
    assert "HTTPValidationError" not in document["components"]["schemas"]


# ---------------------------------------------------------------------------------------------------- at size


def _reads(url: str, statements: list[tuple[str, Any]]) -> list[str]:
    """What each captured listing query would read, as its plan says: on SQLite every full scan of a big table; on
    PostgreSQL every plan node that handled more rows than a page needs (EXPLAIN ANALYZE)."""
    found: list[str] = []
    with db.get_engine(url, write=False).connect() as conn:
        for statement, parameters in statements:
            if db.is_sqlite(url):
                plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
                found += [row[-1] for row in plan if re.match(r"SCAN (recipient|group_member)\b", row[-1])]
                continue
            (plan,) = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).one()
            nodes = [plan[0]["Plan"]]
            while nodes:
                node = nodes.pop()
                nodes += node.get("Plans", [])
                if node["Actual Rows"] * node["Actual Loops"] > 3 * MAX_PAGE:
                    found.append(f"{node['Node Type']} on {node.get('Relation Name')}: {node['Actual Rows']} rows")
    return found


MAX_PAGE = 1_001


def test_deep_and_group_pages_of_a_big_database_answer_at_once(big_url: str) -> None:
    """260,000 recipients: the last page, a page of a group holding one recipient in a thousand, and a deep page of
    a group cost what the first page costs (keyset on the primary key and group_member's key): each is timed, and
    each query it ran is explained, to show it reads no further than its page."""
    rest = make_api(big_url)
    last_id = bigdb.EXPECTED.recipients
    probes = {
        f"/recipients/?after={last_id - 100}": list(range(last_id - 99, last_id + 1)),
        "/recipients/active?limit=1000&after=250000": None,
        "/groups/2/recipients?limit=100": list(range(1, 100_000, bigdb.VIP_EVERY)),
        "/groups/2/recipients?limit=50&after=200000": list(range(200_001, 250_000, bigdb.VIP_EVERY)),
        "/groups/1/recipients?active=true&limit=1000&after=200000": None,
        f"/groups/1/recipients?after={last_id - 200}": list(range(last_id - 199, last_id - 99)),
    }
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and re.search(r"\b(recipient|group_member)\b", statement):
            statements.append((statement, parameters))

    engine = db.get_engine(big_url, write=False)
    with rest.client:
        rest.get("/recipients/?limit=1")  # the first request opens the engine and checks the schema
        for path, expected in probes.items():
            statements.clear()
            sa.event.listen(engine, "before_cursor_execute", capture)
            try:
                started = time.perf_counter()
                page = ok(rest.get(path))
                elapsed = time.perf_counter() - started
            finally:
                sa.event.remove(engine, "before_cursor_execute", capture)
            assert elapsed < 0.5, f"{path}: {elapsed:.3f} s"
            assert page and statements, path
            if expected is not None:
                assert [r["id"] for r in page] == expected, path
            assert _reads(big_url, statements) == [], path
