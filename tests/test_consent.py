"""The consent rules, through the real CLI on SQLite and PostgreSQL: one recipient per address whatever its case;
nothing but `opt-in` makes an opted-out or forgotten person active again; every change is in the consent log;
`forget` leaves only a hash."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime

import pytest
import sqlalchemy as sa

from campaign_manager import db
from conftest import Run, assert_error

Cm = Callable[..., Run]


def _status(cm: Cm, email: str) -> str:
    return str(cm(["recipient", "show", email, "--json"]).json()["status"])


def _history(cm: Cm, email: str) -> list[dict[str, str]]:
    return list(cm(["recipient", "export", email]).json()["consent_history"])


def _database_text(url: str) -> str:
    """Every row of every table (ours, Alembic's, anyone's), as text."""
    with db.get_engine(url).connect() as conn:
        metadata = sa.MetaData()
        metadata.reflect(conn)
        return "\n".join(str(tuple(row)) for table in metadata.sorted_tables for row in conn.execute(table.select()))


def test_emails_differing_only_in_case_are_one_recipient(cm: Cm) -> None:
    cm("group create news")
    rid = cm("recipient create Ada@Example.com --json").json()["id"]
    for spelling in ("ada@example.com", "ADA@EXAMPLE.COM", "  aDa@eXample.com "):
        assert_error(cm(["recipient", "create", spelling, "--group", "news"], ok=False), 4, "already exists")
    added = cm("group add-recipients news --email ADA@example.com --json").json()
    assert added[0]["outcome"] == "added"
    assert cm("recipient opt-out aDA@EXAMPLE.com --json").json()["id"] == rid
    people = cm("recipient list --json").json()
    assert [(p["id"], p["email"], p["groups"]) for p in people] == [(rid, "Ada@example.com", ["news"])]


# Everything that could make an opted-out person active again, short of `opt-in`: (command, exit code).
ATTEMPTS = [
    ("recipient create bob@example.com", 5),
    ("recipient create BOB@Example.com --name Bob --group news", 5),
    ("group add-recipients news --email Bob@example.com", 0),
    ("recipient update bob@example.com --name Bob --attr plan=pro --add-group news", 0),
    ("campaign create --title t --subject s --text x --group news --recipient bob@example.com", 0),
    ("recipient opt-out bob@example.com --reason again", 0),
]


@pytest.mark.parametrize("known", [True, False], ids=["known", "unknown-when-opted-out"])
@pytest.mark.parametrize(("attempt", "exit_code"), ATTEMPTS, ids=[a for a, _ in ATTEMPTS])
def test_opted_out_stays_out_until_opt_in(cm: Cm, known: bool, attempt: str, exit_code: int) -> None:
    cm("group create news")
    if known:
        cm("group add-recipients news --email bob@example.com")
    cm("recipient opt-out Bob@Example.com --reason 'asked to stop'")

    run = cm(attempt, ok=None)
    assert run.exit_code == exit_code, run.stderr
    if exit_code:
        assert_error(run, exit_code, "opted out", "opt-in")

    assert _status(cm, "bob@example.com") == "opted_out"
    assert cm("recipient list --active --json").json() == []
    campaign = cm("campaign create --title t --subject s --text x --group news --recipient bob@example.com --json")
    assert campaign.json()["audience"] == 0
    history = _history(cm, "bob@example.com")
    assert [(e["action"], e["reason"]) for e in history] == [("opt_out", "asked to stop")]

    cm("recipient opt-in bob@example.com --reason 'signed up again'")
    assert _status(cm, "bob@example.com") == "active"
    assert cm(f"campaign show {campaign.json()['id']} --json").json()["audience"] == 1


def test_opting_out_an_unknown_address_records_it(cm: Cm) -> None:
    out = cm("recipient opt-out New@Example.com --reason 'phone call' --json")
    assert "opted out" in out.stderr
    record = out.json()
    assert (record["email"], record["status"], record["opt_out_reason"]) == (
        "New@example.com",
        "opted_out",
        "phone call",
    )
    assert record["opted_out_at"] is not None
    assert [r["email"] for r in cm("recipient list --opted-out --json").json()] == ["New@example.com"]
    assert cm("recipient list --active --json").json() == []


def test_opt_out_and_opt_in_take_an_id(cm: Cm) -> None:
    rid = cm("recipient create ada@example.com --json").json()["id"]
    assert cm(f"recipient opt-out {rid} --json").json()["status"] == "opted_out"
    assert cm(f"recipient opt-in {rid} --json").json()["status"] == "active"
    assert_error(cm("recipient opt-out 999", ok=False), 3, "no recipient '999'")


def test_every_change_is_in_the_consent_log(cm: Cm) -> None:
    cm("recipient create ada@example.com --name Ada")
    cm("recipient opt-out ada@example.com --reason unsubscribed-link")
    repeat = cm("recipient opt-out ADA@example.com --reason again")  # no change, so no event
    assert "already opted out" in repeat.stderr
    cm("recipient opt-in ada@example.com --reason 'double opt-in'")
    assert "already active" in cm("recipient opt-in ada@example.com").stderr  # no change, no event
    cm("recipient opt-out ada@example.com")
    before = _history(cm, "ada@example.com")
    assert [(e["action"], e["reason"], e["source"]) for e in before] == [
        ("opt_out", "unsubscribed-link", "cm recipient opt-out"),
        ("opt_in", "double opt-in", "cm recipient opt-in"),
        ("opt_out", None, "cm recipient opt-out"),
    ]
    cm("recipient forget ada@example.com")
    cm("recipient opt-in ada@example.com --reason 'came back'")
    history = _history(cm, "ada@example.com")
    # A forgotten person's history keeps what happened and when, never free text; the person who came back is
    # a new recipient, whose own reasons are kept.
    assert [(e["action"], e["reason"], e["source"]) for e in history] == [
        ("opt_out", None, "cm recipient opt-out"),
        ("opt_in", None, "cm recipient opt-in"),
        ("opt_out", None, "cm recipient opt-out"),
        ("forget", None, "cm recipient forget"),
        ("opt_in", "came back", "cm recipient opt-in"),
    ]
    times = [datetime.fromisoformat(e["at"]) for e in history]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)


@pytest.mark.parametrize("by", ["email", "id"])
def test_forget_erases_everything_but_a_hash(cm: Cm, db_url: str, by: str) -> None:
    cm("group create news")
    rid = cm(
        "recipient create Ada@Example.com --name 'Ada Lovelace' --phone 5550199 --attr city=Zurich --group news --json"
    ).json()["id"]
    cm("group add-recipients news --email bob@example.com")
    cid = cm("campaign create --title t --subject s --text x --group news --recipient ada@example.com --json")
    cid = cid.json()["id"]
    cm("recipient opt-out ada@example.com --reason x")

    run = cm(["recipient", "forget", "ada@example.com" if by == "email" else str(rid), "--json"])
    expected_hash = hashlib.sha256(b"ada@example.com").hexdigest()
    assert run.json() == {
        "id": rid,
        "forgotten": True,
        "changed": True,
        "suppression_hash": expected_hash,
        "staged_uploads": 0,
    }
    assert run.stderr == f"forgot recipient {rid}; the address is suppressed for good\n"  # by id, not address

    text = _database_text(db_url).lower()
    for trace in ("ada@example.com", "ada lovelace", "5550199", "zurich"):
        assert trace not in text
    assert expected_hash in text
    for command in (f"recipient show {rid}", "recipient show ada@example.com", "recipient export ada@example.com"):
        assert_error(cm(command, ok=False), 3, "no recipient")
    assert [r["email"] for r in cm("recipient list --json").json()] == ["bob@example.com"]
    assert cm("group show news --json").json()["members"] == 1
    shown = cm(f"campaign show {cid} --json").json()
    assert (shown["audience"], shown["named_recipients"]) == (1, 0)


@pytest.mark.parametrize(
    ("command", "exit_code", "message"),
    [
        ("recipient create ada@example.com", 5, "forgotten"),
        ("recipient create ADA@EXAMPLE.COM --name Ada", 5, "forgotten"),
        ("recipient opt-out ada@example.com", 5, "forgotten"),
        ("campaign create --title t --subject s --text x --recipient ada@example.com", 3, "no recipient"),
        ("recipient update ada@example.com --name Ada", 3, "no recipient"),
    ],
)
def test_a_forgotten_address_cannot_come_back(cm: Cm, command: str, exit_code: int, message: str) -> None:
    cm("group create news")
    cm("recipient create ada@example.com --name Ada --group news")
    cm("recipient forget ada@example.com")
    cid = cm("campaign create --title t --subject s --text x --group news --json").json()["id"]
    assert_error(cm(command, ok=False), exit_code, message)
    added = cm("group add-recipients news --email Ada@Example.com --json").json()
    assert [(r["outcome"], r["reason"]) for r in added] == [("suppressed", "forgotten on request")]
    assert cm("recipient list --json").json() == []
    assert cm(f"campaign show {cid} --json").json()["audience"] == 0
    assert cm("recipient forget ADA@example.com").stderr == "that address was already forgotten\n"


def test_opt_in_is_the_way_back_for_a_forgotten_address(cm: Cm) -> None:
    cm("group create news")
    cm("recipient create ada@example.com --name Ada --attr city=Zurich --group news")
    cm("recipient forget ada@example.com")
    back = cm("recipient opt-in ADA@example.com --reason 'signed up again' --json").json()
    # A new recipient: active, and nothing of the erased data.
    assert (back["email"], back["status"], back["name"], back["attributes"], back["groups"]) == (
        "ADA@example.com",
        "active",
        None,
        {},
        [],
    )
    assert [r["outcome"] for r in cm("group add-recipients news --email ada@example.com --json").json()] == ["added"]
    assert cm("campaign create --title t --subject s --text x --group news --json").json()["audience"] == 1
    assert_error(cm("recipient opt-in nobody@example.com", ok=False), 3, "no recipient")
