"""The seed system's README, run against a real `cm serve`: each of its curl examples, exactly as the README wrote it
but for the `Authorization` header, sent over HTTP; then the answers and the database are checked (SQLite and
PostgreSQL). The import a campaign's `recipient_emails` queue is run by the real worker code (`api.drain`)."""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from campaign_manager import api, db
from serve_process import ServeProcess

TOKEN = "seed-example-token"

# The "Usage Examples" of the seed's README, verbatim.
SEED_EXAMPLES = {
    "Create a Campaign": """curl -X POST "http://localhost:8000/campaigns/" \\
  -H "Content-Type: application/json" \\
  -d '{
    "title": "Welcome Campaign",
    "message": "Welcome to our platform!",
    "recipient_emails": ["user1@example.com", "user2@example.com"]
  }'""",
    "Create a Group": """curl -X POST "http://localhost:8000/groups/" \\
  -H "Content-Type: application/json" \\
  -d '{
    "name": "VIP Customers",
    "description": "High-value customers"
  }'""",
    "Update a Group": """curl -X PATCH "http://localhost:8000/groups/1" \\
  -H "Content-Type: application/json" \\
  -d '{
    "name": "Updated VIP Customers",
    "description": "Updated description"
  }'""",
    "Add Recipients to a Group": """curl -X PATCH "http://localhost:8000/groups/1/recipients" \\
  -H "Content-Type: application/json" \\
  -d '{
    "recipient_emails": ["user1@example.com", "user2@example.com"]
  }'""",
    "Update a Recipient": """curl -X PATCH "http://localhost:8000/recipients/1" \\
  -H "Content-Type: application/json" \\
  -d '{
    "name": "John Doe",
    "group_id": 1,
    "opt_out": false
  }'""",
    "Opt-out a Recipient": """curl -X POST "http://localhost:8000/recipients/opt-out" \\
  -H "Content-Type: application/json" \\
  -d '{
    "email": "user@example.com",
    "reason": "No longer interested"
  }'""",
    "Opt-in a Recipient": """curl -X POST "http://localhost:8000/recipients/opt-in" \\
  -H "Content-Type: application/json" \\
  -d '{
    "email": "user@example.com"
  }'""",
}


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """(status, headers, decoded JSON body) of one HTTP request."""
    sent = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(sent, timeout=20) as answer:
            return answer.status, answer.headers, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def run_curl(command: str, server: str) -> Any:
    """A curl command line as urllib: its -X method, its URL moved to `server`, its -H headers (and the token), its -d
    body sent as it is."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "curl"
    method, url, headers, body = "GET", "", {"Authorization": f"Bearer {TOKEN}"}, None
    args = iter(words[1:])
    for word in args:
        if word == "-X":
            method = next(args)
        elif word == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-d":
            body = next(args).encode()
        else:
            url = word.replace("http://localhost:8000", server)
    return request(method, url, body, headers)


def get(server: str, path: str) -> Any:
    status, _headers, body = request("GET", server + path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    return body


def test_the_seed_readme_examples_work_unchanged(db_url: str, serve_factory: Callable[..., ServeProcess]) -> None:
    server = serve_factory(db_url, env={"CM_API_TOKEN": TOKEN})
    url = server.url
    answers = {
        title: run_curl(command, url) for title, command in SEED_EXAMPLES.items() if title == "Create a Campaign"
    }
    # The campaign is created at once; its addresses are imported by a worker, as the seed's Celery task did.
    status, _headers, campaign = answers["Create a Campaign"]
    assert status == 202 and campaign["title"] == "Welcome Campaign" and campaign["job"]["status"] == "queued"
    settings = api.load_settings(None, {"database.url": db_url})
    assert api.drain(settings).ok
    for title, command in SEED_EXAMPLES.items():
        if title != "Create a Campaign":
            answers[title] = run_curl(command, url)
    statuses = {title: answer[0] for title, answer in answers.items()}
    assert statuses == {
        "Create a Campaign": 202,
        "Create a Group": 201,
        "Update a Group": 200,
        "Add Recipients to a Group": 200,
        "Update a Recipient": 200,
        "Opt-out a Recipient": 200,
        "Opt-in a Recipient": 200,
    }
    bodies = {title: answer[2] for title, answer in answers.items()}
    assert bodies["Create a Group"]["id"] == 1
    assert bodies["Update a Group"]["name"] == "Updated VIP Customers"
    assert [r["outcome"] for r in bodies["Add Recipients to a Group"]] == ["added", "added"]
    john = bodies["Update a Recipient"]
    assert (john["email"], john["name"], john["status"], john["groups"]) == (
        "user1@example.com",
        "John Doe",
        "active",
        ["Updated VIP Customers"],
    )
    assert bodies["Opt-out a Recipient"]["status"] == "opted_out"
    assert bodies["Opt-in a Recipient"]["status"] == "active"

    # The seed's listings: bare JSON arrays.
    assert [c["audience"] for c in get(url, "/campaigns/")] == [2]
    assert [(g["name"], g["members"]) for g in get(url, "/groups/")] == [("Updated VIP Customers", 2)]
    assert [r["email"] for r in get(url, "/groups/1/recipients")] == ["user1@example.com", "user2@example.com"]
    everyone = ["user1@example.com", "user2@example.com", "user@example.com"]
    assert (
        [r["email"] for r in get(url, "/recipients/")]
        == everyone
        == [r["email"] for r in get(url, "/recipients/active")]
    )

    # What the database holds.
    with db.get_engine(db_url).connect() as conn:
        recipients = conn.execute(sa.text("SELECT id, email, name, status FROM recipient ORDER BY id")).all()
        members = conn.execute(sa.text("SELECT group_id, recipient_id FROM group_member ORDER BY 2")).all()
        named = conn.execute(sa.text("SELECT campaign_id, recipient_id FROM campaign_recipient ORDER BY 2")).all()
        groups = conn.execute(sa.text("SELECT id, name, description FROM recipient_group")).all()
        events = conn.execute(sa.text("SELECT action, source, reason FROM consent_event ORDER BY id")).all()
        campaigns = conn.execute(sa.text("SELECT title, subject, body_text, status FROM campaign")).all()
    assert [tuple(r) for r in recipients] == [
        (1, "user1@example.com", "John Doe", "active"),
        (2, "user2@example.com", None, "active"),
        (3, "user@example.com", None, "active"),
    ]
    assert [tuple(m) for m in members] == [(1, 1), (1, 2)]
    assert [tuple(n) for n in named] == [(1, 1), (1, 2)]
    assert [tuple(g) for g in groups] == [(1, "Updated VIP Customers", "Updated description")]
    assert [tuple(e) for e in events] == [("opt_out", "api", "No longer interested"), ("opt_in", "api", None)]
    assert [tuple(c) for c in campaigns] == [
        ("Welcome Campaign", "Welcome Campaign", "Welcome to our platform!", "draft")
    ]


def test_the_seed_examples_without_the_token_are_refused(sqlite_url: str, serve_factory: Callable[..., Any]) -> None:
    server = serve_factory(sqlite_url, env={"CM_API_TOKEN": TOKEN})
    for command in SEED_EXAMPLES.values():
        words = shlex.split(command.replace("\\\n", " "))
        method, url, body = words[2], words[3].replace("http://localhost:8000", server.url), words[-1].encode()
        status, headers, answer = request(method, url, body, {"Content-Type": "application/json"})
        assert (status, answer["code"], headers["WWW-Authenticate"][:6]) == (401, "unauthorized", "Bearer")
    with db.get_engine(sqlite_url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM recipient")).scalar_one() == 0
