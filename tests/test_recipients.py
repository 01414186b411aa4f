"""`cm recipient ...` through the real CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Run

Cm = Callable[..., Run]
RECIPIENT_FIELDS = {"id", "email", "name", "status", "groups"}


def test_create_and_show_by_id_or_any_spelling_of_the_email(cm: Cm) -> None:
    cm("group create news")
    created = cm(
        "recipient create Ada@Example.COM --name 'Ada Lovelace' --phone '+44 20 7946 0000'"
        " --attr city=London --attr plan=pro --group news --json"
    ).json()
    assert created.keys() >= RECIPIENT_FIELDS
    assert created["email"] == "Ada@example.com"  # email-validator lowercases the domain only
    assert created["name"] == "Ada Lovelace"
    assert created["phone"] == "+44 20 7946 0000"
    assert created["status"] == "active"
    assert created["groups"] == ["news"]
    assert created["attributes"] == {"city": "London", "plan": "pro"}
    for ref in (str(created["id"]), "Ada@example.com", "ada@example.com", "ADA@EXAMPLE.COM", " ada@example.com "):
        assert cm(["recipient", "show", ref, "--json"]).json() == created


def test_show_renders_a_record_for_people(cm: Cm) -> None:
    cm("recipient create ada@example.com --name '[bold]Ada[/bold]' --attr note=[x]")
    out = cm("recipient show ada@example.com").stdout
    # Names are data, never Rich markup.
    assert "name: [bold]Ada[/bold]" in out
    assert "attributes: note=[x]" in out
    assert "email: ada@example.com" in out


def _seed(cm: Cm) -> dict[str, int]:
    """ada (news, vip), bob (news, opted out), émile (no group), dan (vip), in that id order."""
    cm("group create news")
    vip = cm("group create vip --json").json()["id"]
    ids = {
        "ada": cm("recipient create ada@example.com --name 'Ada Lovelace' --group news --group vip --json"),
        "bob": cm("recipient create bob@example.com --name Bob --group news --json"),
        "emile": cm("recipient create emile@example.com --name 'Émile Zola' --json"),
        "dan": cm("recipient create dan_x@other.org --group vip --json"),
    }
    cm("recipient opt-out bob@example.com --reason moved")
    return {"vip": vip, **{name: run.json()["id"] for name, run in ids.items()}}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("", ["ada", "bob", "emile", "dan"]),
        ("--active", ["ada", "emile", "dan"]),
        ("--opted-out", ["bob"]),
        ("--group news", ["ada", "bob"]),
        ("--group {vip}", ["ada", "dan"]),  # a group by id
        ("--group news --active", ["ada"]),
        ("--group news --opted-out", ["bob"]),
        ("--search LOVELACE", ["ada"]),
        ("--search Example.COM", ["ada", "bob", "emile"]),
        ("--search émile", ["emile"]),
        ("--search 'ÉMILE ZOLA'", ["emile"]),  # Unicode case folding, on SQLite too
        ("--search _x@", ["dan"]),
        ("--search %", []),  # LIKE wildcards in the search text match only themselves
        ("--search a_a", []),
        ("--search example --active", ["ada", "emile"]),
        ("--limit 2", ["ada", "bob"]),
        ("--limit 2 --offset 1", ["bob", "emile"]),
        ("--offset 3", ["dan"]),
        ("--limit 0", []),
        ("--active --limit 1 --offset 1", ["emile"]),
    ],
)
def test_list_filters(cm: Cm, args: str, expected: list[str]) -> None:
    ids = _seed(cm)
    rows = cm(f"recipient list {args.format(**ids)} --json").json()
    assert all(row.keys() >= RECIPIENT_FIELDS for row in rows)
    assert [row["id"] for row in rows] == [ids[name] for name in expected]


def test_list_json_fields_and_table(cm: Cm) -> None:
    ids = _seed(cm)
    rows = {row["id"]: row for row in cm("recipient list --json").json()}
    assert rows[ids["ada"]]["groups"] == ["news", "vip"]
    assert rows[ids["bob"]]["status"] == "opted_out"
    assert rows[ids["bob"]]["opt_out_reason"] == "moved"
    assert rows[ids["emile"]]["groups"] == []
    table = cm("recipient list").stdout
    assert "ada@example.com" in table and "news, vip" in table and "opted_out" in table


@pytest.mark.parametrize("args", ["", "--group news", "--limit 1 --offset 1"])
def test_active_is_list_active(cm: Cm, args: str) -> None:
    _seed(cm)
    assert cm(f"recipient active {args} --json").json() == cm(f"recipient list --active {args} --json").json()


def test_update(cm: Cm) -> None:
    cm("group create news")
    cm("group create vip")
    cm("group create trial")
    created = cm(
        "recipient create ada@example.com --name Ada --phone 123 --attr plan=free --attr city=Paris"
        " --group news --group trial --json"
    )
    rid = created.json()["id"]
    updated = cm(
        f"recipient update {rid} --name 'Ada L.' --attr plan=pro --attr city= --attr tz=UTC"
        " --add-group vip --add-group news --remove-group trial --json"
    ).json()
    assert updated["name"] == "Ada L."
    assert updated["phone"] == "123"  # not given: unchanged
    assert updated["attributes"] == {"plan": "pro", "tz": "UTC"}  # an empty value removes the key
    assert updated["groups"] == ["news", "vip"]
    assert updated["status"] == "active"
    assert updated["updated_at"] > updated["created_at"]
    # By email this time; empty values clear name and phone.
    cleared = cm("recipient update ADA@example.com --name '' --phone '' --json").json()
    assert cleared["name"] is None and cleared["phone"] is None
    assert cm("recipient show ada@example.com --json").json() == cleared
    assert [r["email"] for r in cm("group recipients trial --json").json()] == []


def test_update_does_not_touch_consent(cm: Cm) -> None:
    cm("group create news")
    cm("recipient opt-out bob@example.com")
    updated = cm("recipient update bob@example.com --name Bob --add-group news --json").json()
    assert updated["status"] == "opted_out"
    assert updated["groups"] == ["news"]
    assert cm("recipient list --active --json").json() == []


def test_export_holds_everything_about_the_person(cm: Cm, tmp_path: Path) -> None:
    cm("group create news")
    cm("recipient create ada@example.com --name Ada --phone 123 --attr city=Zurich --group news")
    cm("recipient create bob@example.com")
    named = cm("campaign create --title Named --subject S --text x --recipient ada@example.com --json").json()["id"]
    cm("campaign create --title Other --subject S --text x --recipient bob@example.com")
    rows = tmp_path / "rows.csv"
    rows.write_text("email,name\nada@example.com," + "A" * 201 + "\nbob@example.com," + "B" * 201 + "\n")
    job = cm(["group", "add-recipients", "news", "--csv", str(rows), "--wait", "--json"]).json()["id"]
    cm("recipient opt-out ada@example.com --reason 'too many mails'")
    exported = cm("recipient export ADA@example.com").json()
    shown = cm("recipient show ada@example.com --json").json()
    extra = ("consent_history", "campaigns", "deliveries", "rejected_import_rows", "signups")
    assert {k: v for k, v in exported.items() if k not in extra} == shown
    assert exported["campaigns"] == [{"id": named, "title": "Named"}]
    [reject] = exported["rejected_import_rows"]
    assert (reject["job_id"], reject["line"], reject["row"]) == (job, 2, "ada@example.com," + "A" * 201)
    assert (exported["name"], exported["phone"], exported["attributes"]) == ("Ada", "123", {"city": "Zurich"})
    assert [(e["action"], e["reason"], e["source"]) for e in exported["consent_history"]] == [
        ("opt_out", "too many mails", "cm recipient opt-out")
    ]
