"""Every path that writes recipients obeys the consent module, on SQLite and PostgreSQL.

WRITE_PATHS is the registry: each entry gives one path (a command, run through the real CLI, on both databases) an
address. Every path is given an opted-out address and a forgotten one, and the database is checked afterwards: only
the paths named in `consent.REACTIVATION_PATHS` may make either active again. Later issues add their paths here
(and, for those allowed to reactivate, to REACTIVATION_PATHS). A structural test fails if a module other than the
consent module writes a recipient's status or reads the suppression table, and the consent rules in SQL are checked
against the same rules in Python.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import select

from campaign_manager import db
from campaign_manager.audience import consent
from campaign_manager.audience.address_keys import email_hash, email_key
from campaign_manager.audience.addresses import PLAIN_ADDRESS, normalize_email, sql_plain_normalized
from campaign_manager.models import Recipient
from campaign_manager.states import RecipientStatus
from conftest import Run
from serve_process import ServeProcess
from signup_helpers import open_site, sign_up_and_confirm

Cm = Callable[..., Run]
OPTED_OUT, FORGOTTEN, PENDING = "out@example.com", "gone@example.com", "pending@example.com"
SRC = Path(__file__).resolve().parents[1] / "src" / "campaign_manager"


def _import(cm: Cm, tmp_path: Path, address: str, *args: str) -> Run:
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(f"email,name\n{address},Someone\nfresh@example.com,Fresh\n")
    return cm(["group", "add-recipients", "news", "--csv", str(csv_file), "--wait", *args], ok=None)


@dataclass
class House:
    """`cm` over the test's database (called as the `cm` fixture is), with what the `cm serve` paths need."""

    cm: Cm
    url: str
    serve_factory: Callable[..., ServeProcess]

    def __call__(self, *args: object, **kwargs: object) -> Run:
        return self.cm(*args, **kwargs)


def _sign_up(house: Cm, tmp: Path, address: str, *, confirm: bool, double_opt_in: bool = True) -> None:
    """`cm serve`'s form (a real process) for `address`, asking for the public group `news`; with `confirm`, the
    worker mails the confirmation and its link's button is pressed (when a confirmation went out)."""
    assert isinstance(house, House)
    house(["group", "update", "news", "--public"])
    site = open_site(house.url, tmp / "site", house.serve_factory, double_opt_in=double_opt_in)
    group = str(house(["group", "show", "news", "--json"]).json()["id"])
    if confirm:
        sign_up_and_confirm(site, address, name="Someone", group=group)
    else:
        assert site.subscribe(address, name="Someone", group=group)[0] == 200
        site.drain()
    site.server.stop()


# path name -> what it does with an address. Each runs through the real CLI (or a real `cm serve`), whatever its
# exit code.
WRITE_PATHS: dict[str, Callable[[Cm, Path, str], object]] = {
    "cm recipient create": lambda cm, _tmp, a: cm(["recipient", "create", a, "--group", "news"], ok=None),
    "cm recipient update": lambda cm, _tmp, a: cm(
        ["recipient", "update", a, "--name", "New", "--attr", "x=1"], ok=None
    ),
    "cm group add-recipients": lambda cm, _tmp, a: cm(["group", "add-recipients", "news", "--email", a], ok=None),
    "cm group add-recipients --csv": lambda cm, tmp, a: _import(cm, tmp, a),
    "cm group add-recipients --csv --update-existing": lambda cm, tmp, a: _import(cm, tmp, a, "--update-existing"),
    "cm campaign create --recipient": lambda cm, _tmp, a: cm(
        ["campaign", "create", "--title", "T", "--subject", "S", "--text", "Hi", "--group", "news", "--recipient", a],
        ok=None,
    ),
    "cm recipient opt-in": lambda cm, _tmp, a: cm(["recipient", "opt-in", a], ok=None),
    "cm recipient forget": lambda cm, _tmp, a: cm(["recipient", "forget", a], ok=None),
    "cm serve sign-up": lambda cm, tmp, a: _sign_up(cm, tmp, a, confirm=False),
    consent.CONFIRMED_SIGNUP: lambda cm, tmp, a: _sign_up(cm, tmp, a, confirm=True),
    "cm serve sign-up, no double opt-in": lambda cm, tmp, a: _sign_up(cm, tmp, a, confirm=False, double_opt_in=False),
}


def _state(url: str, address: str) -> dict[str, object]:
    """What the database holds about an address: its recipient's status, its groups, whether it is in a campaign's
    audience, whether it is suppressed."""
    key = email_key(normalize_email(address))
    with db.get_engine(url).connect() as conn:
        row = conn.execute(sa.text("SELECT id, status FROM recipient WHERE email_key = :k"), {"k": key}).first()
        rid = None if row is None else row.id
        members = conn.execute(
            sa.text("SELECT count(*) FROM group_member WHERE recipient_id = :r"), {"r": rid}
        ).scalar_one()
        suppressed = conn.execute(
            sa.text("SELECT count(*) FROM suppression WHERE email_hash = :h"), {"h": email_hash(key)}
        ).scalar_one()
    return {"status": None if row is None else row.status, "members": members, "suppressed": bool(suppressed)}


def _audiences(cm: Cm) -> int:
    return sum(int(c["audience"]) for c in cm("campaign list --json").json())


@pytest.fixture
def house(cm: Cm, db_url: str, serve_factory: Callable[..., ServeProcess]) -> House:
    """A group, an opted-out address and a forgotten one."""
    cm("group create news")
    cm(["recipient", "opt-out", OPTED_OUT])
    cm(["recipient", "create", FORGOTTEN, "--group", "news"])
    cm(["recipient", "forget", FORGOTTEN])
    return House(cm, db_url, serve_factory)


@pytest.mark.parametrize("path", sorted(WRITE_PATHS))
def test_an_opted_out_address_stays_out_on_every_path(house: Cm, db_url: str, tmp_path: Path, path: str) -> None:
    WRITE_PATHS[path](house, tmp_path, OPTED_OUT)
    state = _state(db_url, OPTED_OUT)
    if path in consent.REACTIVATION_PATHS:
        assert state["status"] == "active"
    elif path == "cm recipient forget":
        assert state == {"status": None, "members": 0, "suppressed": True}
    else:
        assert state["status"] == "opted_out" and state["members"] == 0 and not state["suppressed"], state
        assert _audiences(house) == 0  # named in a campaign or not, never in an audience
    if path.startswith("cm group add-recipients --csv"):  # the good row beside it was imported
        assert _state(db_url, "fresh@example.com")["status"] == "active"


@pytest.mark.parametrize("path", sorted(WRITE_PATHS))
def test_a_forgotten_address_stays_forgotten_on_every_path(house: Cm, db_url: str, tmp_path: Path, path: str) -> None:
    WRITE_PATHS[path](house, tmp_path, FORGOTTEN)
    state = _state(db_url, FORGOTTEN)
    if path in consent.UNFORGET_PATHS:
        assert state == {"status": "active", "members": 0, "suppressed": False}
    else:
        assert state == {"status": None, "members": 0, "suppressed": True}
        assert _audiences(house) == 0


# Reactivation paths that are no CLI command, and the tests that give them an opted-out and a forgotten address.
TESTED_ELSEWHERE = {
    "cm serve undo (web-undo)": "tests/test_serve_unsubscribe.py",
    "POST /recipients/opt-in": "tests/test_api_rest.py (opt_in_by_address, a_forgotten_address_...opts_in)",
}


def test_every_reactivation_path_is_in_the_registry() -> None:
    assert set(consent.UNFORGET_PATHS) <= set(consent.REACTIVATION_PATHS) <= set(WRITE_PATHS) | set(TESTED_ELSEWHERE)


@pytest.mark.parametrize("path", ["cm recipient create", "cm group add-recipients", "cm group add-recipients --csv"])
def test_an_operators_add_makes_a_pending_address_active(house: Cm, db_url: str, tmp_path: Path, path: str) -> None:
    """A pending address (a sign-up nobody confirmed) is one the operator may add: it becomes active, with a
    consent event saying who made it so."""
    _sign_up(house, tmp_path, PENDING, confirm=False)
    assert _state(db_url, PENDING)["status"] == "pending"
    WRITE_PATHS[path](house, tmp_path, PENDING)
    assert _state(db_url, PENDING) == {"status": "active", "members": 1, "suppressed": False}
    history = house(["recipient", "export", PENDING]).json()["consent_history"]
    assert [(e["action"], e["reason"]) for e in history] == [("opt_in", consent.ADMITTED_REASON)]
    assert history[0]["source"].startswith("import job " if path.endswith("--csv") else path)


# -- structure: no module but consent writes a status or reads `suppression` --------------------------------------

_SUPPRESSION_SQL = re.compile(r"\b(FROM|JOIN|INTO|TABLE|UPDATE)\s+suppression\b", re.IGNORECASE)
_STATUS_SQL = re.compile(r"'(active|opted_out)'")


def _text(node: ast.Constant | ast.JoinedStr) -> str:
    """A string literal's text; in an f-string, a `RecipientStatus.X` placeholder stands for its value (the SQL
    then names that status as surely as a literal would), any other placeholder for nothing."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else ""
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(str(value.value))
        elif isinstance(value, ast.FormattedValue):
            named = re.fullmatch(r"(?:\w+\.)*RecipientStatus\.(\w+)", ast.unparse(value.value))
            parts.append(RecipientStatus[named.group(1)].value if named else "")
    return "".join(parts)


def consent_breaches(path: Path) -> list[str]:
    """What in one module writes a recipient's status or reads the suppression table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Name) and node.id == "Suppression":
            found.append(f"{where}: uses the Suppression table")
        elif isinstance(node, ast.alias) and node.name == "Suppression":
            found.append(f"{where}: imports the Suppression table")
        elif isinstance(node, ast.Constant | ast.JoinedStr):
            text = _text(node)
            if _SUPPRESSION_SQL.search(text):
                found.append(f"{where}: SQL reads or writes suppression")
            if _STATUS_SQL.search(text) and re.search(r"\b(INSERT|UPDATE|SET|WHERE)\b", text):
                found.append(f"{where}: SQL names a recipient status")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Recipient":
            found.append(f"{where}: makes a Recipient (consent.new_recipient does)")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for part in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if (
                        isinstance(part, ast.Attribute)
                        and part.attr == "status"
                        and "recipient" in ast.unparse(part.value).lower()
                    ):
                        found.append(f"{where}: assigns a recipient's status")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "values"
            and "Recipient" in ast.unparse(node.func.value)
            and any(k.arg == "status" for k in node.keywords)
        ):
            found.append(f"{where}: updates a recipient's status")
    return found


def test_only_the_consent_module_writes_status_or_reads_suppression() -> None:
    allowed = {SRC / "audience" / "consent.py", SRC / "models.py"}
    modules = [p for p in sorted(SRC.rglob("*.py")) if p not in allowed and "migrations" not in p.parts]
    assert len(modules) > 30
    breaches = [line for module in modules for line in consent_breaches(module)]
    assert breaches == []


def test_the_structural_check_finds_each_kind_of_breach(tmp_path: Path) -> None:
    """The check above can fail: each thing it looks for, written once, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from campaign_manager.models import Recipient, Suppression\n"
        "def f(session, recipient, conn):\n"
        "    session.get(Suppression, 'x')\n"
        "    conn.execute('SELECT email_hash FROM suppression')\n"
        "    conn.execute(\"UPDATE recipient SET status = 'active' WHERE id = 1\")\n"
        "    conn.execute(f\"UPDATE recipient SET status = '{states.RecipientStatus.OPTED_OUT}' WHERE id = {i}\")\n"
        "    session.add(Recipient(email='a@b.c', email_key='a@b.c'))\n"
        "    recipient.status = 'active'\n"
        "    session.exec(update(Recipient).values(status='active'))\n"
    )
    kinds = [line.split(": ", 1)[1] for line in consent_breaches(bad)]
    assert kinds.count("SQL names a recipient status") == 2  # the literal, and the f-string naming the enum
    assert sorted(set(kinds)) == sorted(
        {
            "imports the Suppression table",
            "uses the Suppression table",
            "SQL reads or writes suppression",
            "SQL names a recipient status",
            "makes a Recipient (consent.new_recipient does)",
            "assigns a recipient's status",
            "updates a recipient's status",
        }
    )


# -- the rules in SQL agree with the rules in Python -------------------------------------------------------------

STATUSES = [None, "active", "opted_out", "bounced", "pending"]


def test_sql_may_add_agrees_with_may_add(db_url: str) -> None:
    cases = [(status, gone) for status in STATUSES for gone in (0, 1)]
    condition = consent.sql_may_add("c.status", "c.gone")
    with db.get_engine(db_url).connect() as conn:
        conn.execute(sa.text("CREATE TEMPORARY TABLE c (status VARCHAR(20), gone INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO c VALUES (:status, :gone)"), [{"status": s, "gone": g} for s, g in cases])
        query = f"SELECT status, gone, CASE WHEN {condition} THEN 1 ELSE 0 END FROM c"
        got = {(s, int(g)): bool(ok) for s, g, ok in conn.execute(sa.text(query))}
    expected = {(s, g): consent.may_add(s, forgotten=bool(g)) is None for s, g in cases}
    assert got == expected
    assert {case for case, ok in expected.items() if ok} == {(None, 0), ("active", 0), ("pending", 0)}


def test_mailable_agrees_with_may_mail(cm: Cm, db_url: str) -> None:
    cm("recipient create a@example.com")
    cm("recipient create b@example.com")
    cm(["recipient", "opt-out", "b@example.com"])
    with db.open_session(db_url, write=False) as session:
        everyone = session.exec(select(Recipient.email, Recipient.status)).all()
        mailable = set(session.exec(select(Recipient.email).where(consent.mailable())).all())
    assert len(everyone) == 2
    assert mailable == {email for email, status in everyone if consent.may_mail(status)} == {"a@example.com"}


PLAIN = ["Ada@Example.COM", "x.y+tag@Sub.Example.org", "POSTMASTER@example.com", "o'neil@EXAMPLE.ie"]


def test_sql_plain_normalized_agrees_with_normalize_email(db_url: str) -> None:
    plain = [a for a in PLAIN if PLAIN_ADDRESS.fullmatch(a)]
    assert len(plain) >= 3
    find = "instr" if db.is_sqlite(db_url) else "strpos"
    with db.get_engine(db_url).connect() as conn:
        expression = sql_plain_normalized("CAST(:a AS VARCHAR(254))", find)
        got = [conn.execute(sa.text(f"SELECT {expression}"), {"a": a}).scalar_one() for a in plain]
    assert got == [normalize_email(a) for a in plain]
