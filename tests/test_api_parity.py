"""The API and the CLI are one set of rules: the same scenario, through `cm` on one fresh database and through the
REST API on another (SQLite, and PostgreSQL), leaves the same recipients, statuses, groups, members, consent
events, campaigns and audiences. Consent, limits and dedup are the services', whichever door a request came in by."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from campaign_manager import api, db
from campaign_manager.serve.app import create_app
from conftest import Run, drop_postgres_database, make_postgres_database

with warnings.catch_warnings():  # starlette asks for httpx2, which the dev extra does not pin yet
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "parity"
CAMPAIGN_LIST = ["ada@example.com", "erin@example.com", "dave@example.com", "not-an-address", "ERIN@example.com"]

SNAPSHOT = {
    "recipients": "SELECT id, email, name, phone, status, attributes, opt_out_reason FROM recipient ORDER BY id",
    "groups": "SELECT id, name, description FROM recipient_group ORDER BY id",
    "members": "SELECT group_id, recipient_id FROM group_member ORDER BY group_id, recipient_id",
    # The source differs by design (`cm recipient opt-out` or `api`); what was done, to whom and why does not.
    "consent": "SELECT id, recipient_id, action, reason FROM consent_event ORDER BY id",
    "suppressed": "SELECT email_hash FROM suppression ORDER BY email_hash",
    "campaigns": "SELECT id, title, subject, body_text, status FROM campaign ORDER BY id",
    "campaign_groups": "SELECT campaign_id, group_id FROM campaign_group ORDER BY 1, 2",
    "campaign_recipients": "SELECT campaign_id, recipient_id FROM campaign_recipient ORDER BY 1, 2",
    "jobs": "SELECT id, kind, status FROM job ORDER BY id",
}


@pytest.fixture
def api_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A second fresh database on the same backend as `db_url`, for the API's half."""
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'api.db'}"
        db.upgrade(url)
        yield url
        return
    url = make_postgres_database()
    try:
        db.upgrade(url)
        yield url
    finally:
        drop_postgres_database(url)


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with db.get_engine(url).connect() as conn:
        found = {name: [tuple(row) for row in conn.execute(sa.text(sql))] for name, sql in SNAPSHOT.items()}
        counts = conn.execute(sa.text("SELECT counts FROM job WHERE kind = 'import'")).scalar_one()
    counts = json.loads(counts) if isinstance(counts, str) else counts  # SQLite hands back the text
    found["import_counts"] = [tuple(sorted(counts.items()))]
    return found


def through_the_cli(cm: Callable[..., Run], tmp_path: Path) -> None:
    cm("group create news --description Monthly")
    cm("group create vip")
    cm(
        [
            "recipient",
            "create",
            "ada@example.com",
            "--name",
            "Ada",
            "--phone",
            "+44 20",
            "--attr",
            "city=London",
            "--group",
            "news",
        ]
    )
    added = cm(
        "group add-recipients news --email bob@example.com --email BOB@example.com --email not-an-address"
        " --email carol@example.com",
        ok=False,
    )
    assert added.exit_code == 2  # an invalid address: the others applied all the same
    cm("recipient opt-out carol@example.com --reason asked")
    cm("group add-recipients vip --email carol@example.com --email ada@example.com")
    cm("recipient update bob@example.com --name Bob --add-group vip --attr plan=pro")
    cm("recipient opt-out dave@example.com")
    assert cm("recipient create dave@example.com", ok=False).exit_code == 5
    assert cm("recipient create ada@example.com", ok=False).exit_code == 4
    cm("recipient opt-in carol@example.com --reason back")
    cm("recipient update ada@example.com --remove-group news --attr city=")
    cm("group update vip --name VIPs --description Top")
    cm("recipient opt-out bob@example.com")
    cm("recipient update bob@example.com --name Robert")  # an update never reactivates: bob stays out
    people = tmp_path / "launch.csv"
    people.write_text("email\n" + "\n".join(CAMPAIGN_LIST) + "\n")
    cm(
        [
            "campaign",
            "create",
            "--title",
            "Launch",
            "--subject",
            "Launch",
            "--text",
            "Hello {{ name }}",
            "--group",
            "VIPs",
            "--recipients-csv",
            str(people),
            "--wait",
        ]
    )
    cm("group add-recipients news --email erin@example.com --email dave@example.com")


def through_the_api(url: str) -> None:
    settings = api.load_settings(None, {"database.url": url, "serve.api_token": TOKEN})
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"})

    def call(method: str, path: str, body: Any, status: int = 200) -> Any:
        answer = client.request(method, path, json=body)
        assert answer.status_code == status, answer.text
        return answer.json()

    news = call("POST", "/groups/", {"name": "news", "description": "Monthly"}, 201)["id"]
    vip = call("POST", "/groups/", {"name": "vip"}, 201)["id"]
    call(
        "POST",
        "/recipients/",
        {
            "email": "ada@example.com",
            "name": "Ada",
            "phone": "+44 20",
            "attributes": {"city": "London"},
            "groups": [news],
        },
        201,
    )
    report = call(
        "PATCH",
        f"/groups/{news}/recipients",
        {"recipient_emails": ["bob@example.com", "BOB@example.com", "not-an-address", "carol@example.com"]},
    )
    assert [r["outcome"] for r in report] == ["created", "duplicate", "invalid", "created"]
    call("POST", "/recipients/opt-out", {"email": "carol@example.com", "reason": "asked"})
    call("PATCH", f"/groups/{vip}/recipients", {"recipient_emails": ["carol@example.com", "ada@example.com"]})
    bob = next(r["id"] for r in call("GET", "/recipients/", None) if r["email"] == "bob@example.com")
    call("PATCH", f"/recipients/{bob}", {"name": "Bob", "add_groups": [vip], "attributes": {"plan": "pro"}})
    call("POST", "/recipients/opt-out", {"email": "dave@example.com"})
    assert call("POST", "/recipients/", {"email": "dave@example.com"}, 409)["code"] == "consent"
    assert call("POST", "/recipients/", {"email": "ada@example.com"}, 409)["code"] == "conflict"
    call("POST", "/recipients/opt-in", {"email": "carol@example.com", "reason": "back"})
    call("PATCH", "/recipients/1", {"remove_groups": [news], "attributes": {"city": ""}})
    call("PATCH", f"/groups/{vip}", {"name": "VIPs", "description": "Top"})
    call("PATCH", f"/recipients/{bob}", {"opt_out": True})
    refused = call("PATCH", f"/recipients/{bob}", {"opt_out": False, "name": "Robert"}, 409)
    assert refused["code"] == "consent"
    call("PATCH", f"/recipients/{bob}", {"name": "Robert"})
    made = call(
        "POST",
        "/campaigns/",
        {"title": "Launch", "message": "Hello {{ name }}", "group_ids": [vip], "recipient_emails": CAMPAIGN_LIST},
        202,
    )
    assert made["job"]["status"] == "queued" and api.drain(settings).ok
    call("PATCH", f"/groups/{news}/recipients", {"recipient_emails": ["erin@example.com", "dave@example.com"]})


def test_the_cli_and_the_api_leave_the_same_database(
    cm: Callable[..., Run], db_url: str, api_url: str, tmp_path: Path
) -> None:
    through_the_cli(cm, tmp_path)
    through_the_api(api_url)
    by_cli, by_api = snapshot(db_url), snapshot(api_url)
    assert by_cli == by_api
    # ... and that is what the rules say it should be.
    statuses = {email: status for _id, email, _n, _p, status, _a, _r in by_cli["recipients"]}
    assert statuses == {
        "ada@example.com": "active",
        "bob@example.com": "opted_out",
        "carol@example.com": "active",
        "dave@example.com": "opted_out",
        "erin@example.com": "active",
    }
    assert [action for _i, _r, action, _why in by_cli["consent"]] == ["opt_out", "opt_out", "opt_in", "opt_out"]
    assert dict(by_cli["import_counts"][0])["suppressed"] == 1 and dict(by_cli["import_counts"][0])["invalid"] == 1
