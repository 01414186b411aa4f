"""`cm campaign ...` through the real CLI, on SQLite and PostgreSQL: bodies, targets and the audience."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Run

Cm = Callable[..., Run]
CAMPAIGN_FIELDS = {"id", "title", "subject", "status", "audience"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("--text 'Hello there'", {"text": "Hello there", "html": None, "from": None}),
        ("--text-file body.txt", {"text": "Hi from a file ✓\n", "html": None, "from": None}),
        (
            "--text-file body.txt --html-file body.html",
            {"text": "Hi from a file ✓\n", "html": "<p>Hi</p>\n", "from": None},
        ),
        ("--text hi --from Ada@Example.COM", {"text": "hi", "html": None, "from": "Ada@example.com"}),
    ],
)
def test_create_bodies_and_sender(cm: Cm, tmp_path: Path, args: str, expected: dict[str, str | None]) -> None:
    (tmp_path / "body.txt").write_text("Hi from a file ✓\n", encoding="utf-8")
    (tmp_path / "body.html").write_text("<p>Hi</p>\n", encoding="utf-8")
    created = cm(f"campaign create --title 'May news' --subject \"What's new\" {args} --json").json()
    assert created.keys() >= CAMPAIGN_FIELDS
    assert (created["title"], created["subject"], created["status"], created["audience"]) == (
        "May news",
        "What's new",
        "draft",
        0,
    )
    shown = cm(f"campaign show {created['id']} --json").json()
    assert {key: shown[key] for key in expected} == expected
    assert cm("campaign list --json").json()[0]["id"] == created["id"]


def _audience(cm: Cm, campaign_id: int) -> int:
    return int(cm(f"campaign show {campaign_id} --json").json()["audience"])


def test_audience_is_distinct_active_recipients_of_groups_and_named_people(cm: Cm) -> None:
    cm("group create news")
    cm("group create vip")
    cm("group create empty")
    cm("group add-recipients news --email a@example.com --email b@example.com --email out@example.com")
    cm("group add-recipients vip --email a@example.com --email c@example.com")  # a is in both groups
    cm("recipient create d@example.com")  # named only
    cm("recipient create e@example.com")  # in no target at all
    cm("recipient opt-out out@example.com")
    cm("recipient opt-out named-out@example.com")
    bid = cm("recipient show b@example.com --json").json()["id"]
    created = cm(
        "campaign create --title t --subject s --text x --group news --group vip --group empty --group news"
        f" --recipient d@example.com --recipient {bid} --recipient NAMED-OUT@example.com --json"
    ).json()
    # a, b, c (groups) + d (named); b named twice over, out and named-out opted out, e not targeted.
    assert created["audience"] == 4
    assert created["groups"] == ["empty", "news", "vip"]
    # Who is named is not listed (a campaign may name a million people), only how many: d, b and named-out.
    assert created["named_recipients"] == 3 and "recipients" not in created
    listed = cm("campaign list --json").json()
    assert [(c["id"], c["audience"]) for c in listed] == [(created["id"], 4)]
    assert all(c.keys() >= CAMPAIGN_FIELDS for c in listed)

    # The audience is computed when asked: it follows opt-outs, opt-ins, forgets and membership changes.
    cm("recipient opt-out c@example.com")
    assert _audience(cm, created["id"]) == 3
    cm("recipient opt-in out@example.com")
    assert _audience(cm, created["id"]) == 4
    cm("recipient forget a@example.com")
    assert _audience(cm, created["id"]) == 3
    cm("group remove-recipients news --email b@example.com")  # still named
    assert _audience(cm, created["id"]) == 3
    cm("group add-recipients empty --email e@example.com")
    assert _audience(cm, created["id"]) == 4


def test_list_gives_each_campaign_its_own_audience(cm: Cm) -> None:
    cm("group create news")
    cm("group create vip")
    cm("group add-recipients news --email a@example.com --email b@example.com")
    cm("group add-recipients vip --email c@example.com")
    first = cm("campaign create --title one --subject s --text x --group news --json").json()["id"]
    second = cm("campaign create --title two --subject s --text x --group vip --recipient a@example.com --json")
    third = cm("campaign create --title three --subject s --text x --json").json()["id"]
    listed = {c["id"]: c["audience"] for c in cm("campaign list --json").json()}
    assert listed == {first: 2, second.json()["id"]: 2, third: 0}
    table = cm("campaign list").stdout
    assert "one" in table and "three" in table


def test_show_renders_bodies(cm: Cm) -> None:
    cid = cm("campaign create --title t --subject 'Hello [you]' --text 'Body [b]text[/b]' --json").json()["id"]
    out = cm(f"campaign show {cid}").stdout
    assert "subject: Hello [you]" in out
    assert "text: Body [b]text[/b]" in out
