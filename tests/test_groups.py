"""`cm group ...` through the real CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from campaign_manager import db
from conftest import Run, assert_error, make_cm

Cm = Callable[..., Run]
GROUP_FIELDS = {"id", "name", "description", "members", "active_members"}


def _emails(run: Run) -> list[str]:
    return [row["email"] for row in run.json()]


def test_create_list_show(cm: Cm) -> None:
    news = cm("group create news --description 'Monthly news' --json").json()
    assert news.keys() >= GROUP_FIELDS
    assert (news["name"], news["description"], news["members"], news["active_members"]) == (
        "news",
        "Monthly news",
        0,
        0,
    )
    cm("group create alpha")
    listed = cm("group list --json").json()
    assert [g["name"] for g in listed] == ["alpha", "news"]
    assert all(g.keys() >= GROUP_FIELDS for g in listed)
    for ref in ("news", str(news["id"])):
        assert cm(["group", "show", ref, "--json"]).json() == news
    assert "Monthly news" in cm("group list").stdout


def test_counts_members_and_active_members(cm: Cm) -> None:
    cm("group create news")
    cm("group create vip")
    cm("group create empty")
    cm("group add-recipients news --email a@example.com --email b@example.com --email c@example.com")
    cm("group add-recipients vip --email a@example.com")
    cm("recipient opt-out b@example.com")
    cm("recipient opt-out c@example.com")
    counts = {g["name"]: (g["members"], g["active_members"]) for g in cm("group list --json").json()}
    assert counts == {"empty": (0, 0), "news": (3, 1), "vip": (1, 1)}
    assert cm("group show news --json").json()["active_members"] == 1


def test_the_listing_describes_each_group_as_show_does(cm: Cm, db_url: str) -> None:
    """`cm group list` reads rows of the tables (no ORM objects); what it gives is what describe_groups gives."""
    from campaign_manager.audience import groups

    cm("group create news --description 'Monthly news'")
    cm("group create Alpha")
    cm("group create empty")
    cm("group add-recipients news --email a@example.com --email b@example.com --email c@example.com")
    cm("group add-recipients Alpha --email b@example.com")
    cm(["recipient", "opt-out", "b@example.com"])
    with db.open_session(db_url, write=False) as session:
        described = groups.describe_groups(session, groups.list_groups(session))
        assert groups.describe_all_groups(session) == described
    assert [(g["name"], g["members"], g["active_members"]) for g in described] == [
        ("Alpha", 1, 0),
        ("empty", 0, 0),
        ("news", 3, 2),
    ]
    assert cm("group list --json").json() == [{**g, "created_at": g["created_at"].isoformat()} for g in described]


def test_update(cm: Cm) -> None:
    gid = cm("group create news --description old --json").json()["id"]
    cm("group add-recipients news --email a@example.com")
    renamed = cm("group update news --name weekly --description 'Weekly news' --json").json()
    assert (renamed["id"], renamed["name"], renamed["description"], renamed["members"]) == (
        gid,
        "weekly",
        "Weekly news",
        1,
    )
    assert cm(f"group update {gid} --description '' --json").json()["description"] is None
    assert cm("recipient show a@example.com --json").json()["groups"] == ["weekly"]
    assert_error(cm("group show news", ok=False), 3, "no group 'news'")


@pytest.mark.parametrize("by", ["name", "id"])
def test_delete_keeps_the_recipients(cm: Cm, by: str) -> None:
    gid = cm("group create trial --json").json()["id"]
    cm("group create news")
    cm("group add-recipients trial --email a@example.com --email b@example.com")
    cm("group add-recipients news --email a@example.com")
    deleted = cm(["group", "delete", "trial" if by == "name" else str(gid), "--json"])
    assert deleted.json()["name"] == "trial" and deleted.json()["members"] == 2
    assert "2 members kept" in deleted.stderr
    assert [g["name"] for g in cm("group list --json").json()] == ["news"]
    people = {r["email"]: r["groups"] for r in cm("recipient list --json").json()}
    assert people == {"a@example.com": ["news"], "b@example.com": []}
    # The name is free again.
    assert cm("group create trial --json").json()["members"] == 0


def test_add_recipients_reports_each_input(cm: Cm) -> None:
    cm("group create news")
    cm("recipient create old@example.com")
    cm("recipient create member@example.com --group news")
    cm("recipient create gone@example.com")
    cm("recipient forget gone@example.com")
    cm("recipient opt-out out@example.com")
    inputs = [
        "new@example.com",
        "Old@Example.com",
        "member@example.com",
        "NEW@example.com",
        "not-an-email",
        "out@example.com",
        "gone@example.com",
        "x@localhost",
    ]
    run = cm(["group", "add-recipients", "news", "--json", *[f"--email={e}" for e in inputs]], ok=False)
    # Invalid addresses make the exit code 2; everything else was applied and is reported on stdout.
    assert run.exit_code == 2
    assert run.stderr.strip().splitlines()[-1] == "error: 2 of 8 addresses were invalid; the others were applied"
    results = run.json()
    assert [r["input"] for r in results] == inputs
    assert [r["outcome"] for r in results] == [
        "created",
        "added",
        "already_member",
        "duplicate",
        "invalid",
        "suppressed",
        "suppressed",
        "invalid",
    ]
    by_input = {r["input"]: r for r in results}
    assert "@-sign" in by_input["not-an-email"]["reason"]
    assert by_input["x@localhost"]["reason"]
    assert by_input["out@example.com"]["reason"] == "opted out"
    assert by_input["gone@example.com"]["reason"] == "forgotten on request"
    assert by_input["Old@Example.com"]["email"] == "Old@example.com"
    assert all(r["reason"] is None for r in results if r["outcome"] in ("created", "added", "already_member"))
    members = _emails(cm("group recipients news --json"))
    assert members == ["old@example.com", "member@example.com", "new@example.com"]
    # The stored spelling is the first one seen; an opted-out person stays out of the group and opted out.
    assert cm("recipient show out@example.com --json").json()["status"] == "opted_out"
    assert cm("group show news --json").json()["members"] == 3


def test_add_recipients_all_valid_exits_zero_with_a_summary(cm: Cm) -> None:
    cm("group create news")
    run = cm("group add-recipients news --email a@example.com --email b@example.com --email a@example.com")
    assert run.exit_code == 0
    assert "2 created, 1 duplicate" in run.stderr
    table = run.stdout
    assert "a@example.com" in table and "created" in table and "duplicate" in table
    again = cm("group add-recipients news --email A@example.com --json").json()
    assert again == [{"input": "A@example.com", "email": "A@example.com", "outcome": "already_member", "reason": None}]
    assert len(cm("recipient list --json").json()) == 2


def test_remove_recipients(cm: Cm) -> None:
    gid = cm("group create news --json").json()["id"]
    cm("group add-recipients news --email a@example.com --email b@example.com")
    cm("recipient create c@example.com")
    results = cm(
        f"group remove-recipients {gid} --email A@EXAMPLE.COM --email c@example.com --email nobody@example.com --json"
    ).json()
    assert [(r["input"], r["outcome"]) for r in results] == [
        ("A@EXAMPLE.COM", "removed"),
        ("c@example.com", "not_member"),
        ("nobody@example.com", "unknown"),
    ]
    assert _emails(cm("group recipients news --json")) == ["b@example.com"]
    assert len(cm("recipient list --json").json()) == 3  # removed from the group, not from the database


def test_group_recipients_active(cm: Cm) -> None:
    gid = cm("group create news --json").json()["id"]
    cm("group create other")
    cm(f"group add-recipients {gid} --email a@example.com --email b@example.com --email c@example.com")
    cm("group add-recipients other --email d@example.com")
    cm("recipient opt-out b@example.com")
    assert _emails(cm("group recipients news --json")) == ["a@example.com", "b@example.com", "c@example.com"]
    active = cm(f"group recipients {gid} --active --json").json()
    assert [r["email"] for r in active] == ["a@example.com", "c@example.com"]
    assert all({"id", "email", "name", "status", "groups"} <= r.keys() for r in active)
    assert "b@example.com" not in cm("group recipients news --active").stdout


def test_group_names_are_matched_ignoring_case(cm: Cm) -> None:
    made = cm("group create News --json").json()
    assert_error(cm("group create news", ok=False), 4, "a group named 'News' already exists")
    assert cm("group show NEWS --json").json()["id"] == made["id"]
    cm("group create Other")
    assert_error(cm("group update other --name nEwS", ok=False), 4, "already exists")
    renamed = cm("group update news --name NEWS --json").json()  # its own name in another case is fine
    assert (renamed["id"], renamed["name"]) == (made["id"], "NEWS")
    assert [g["name"] for g in cm("group list --json").json()] == ["NEWS", "Other"]


def test_the_upgrade_stops_on_group_names_differing_only_in_case(new_db_url: str) -> None:
    db_url = new_db_url
    db.upgrade(db_url, "0001")  # a database made by the cm before names were matched ignoring case
    with db.get_engine(db_url).begin() as conn:
        for name in ("News", "news", "VIP", "Émile", "ÉMILE"):
            conn.execute(
                sa.text("INSERT INTO recipient_group (name, created_at, updated_at) VALUES (:n, :t, :t)"),
                {"n": name, "t": datetime.now(UTC)},
            )
    cm = make_cm(db_url)
    run = cm("db upgrade", ok=False)
    assert_error(run, 6, "'News' (id 1) and 'news' (id 2)", "'Émile' (id 4) and 'ÉMILE' (id 5)", "cm group update")
    assert db.current_revision(db_url) == "0001"  # nothing changed
    with db.get_engine(db_url).begin() as conn:
        conn.execute(sa.text("UPDATE recipient_group SET name = 'news-2' WHERE id = 2"))
        conn.execute(sa.text("DELETE FROM recipient_group WHERE id = 5"))
    db._checked.clear()
    cm("db upgrade")
    assert cm("group show NEWS-2 --json").json()["id"] == 2 and cm("group show émile --json").json()["id"] == 4
