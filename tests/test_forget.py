"""`cm recipient forget` leaves nothing of the address behind: not in staged uploads (of queued, failed, cancelled
or running imports), not in rejected rows, not in a free-text reason, and no later import brings the person back."""

from __future__ import annotations

import codecs
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from campaign_manager import db
from campaign_manager.jobs import runner
from conftest import Run, small_segments

Cm = Callable[..., Run]


def _staged(db_url: str, job_id: int) -> bytes:
    with db.get_engine(db_url).connect() as conn:
        chunks = conn.execute(sa.text("SELECT data FROM job_file WHERE job_id = :id ORDER BY seq"), {"id": job_id})
        return b"".join(bytes(row[0]) for row in chunks)


def _database_text(db_url: str) -> str:
    """Every value of every table, as text (what a person reading the database file would find)."""
    parts = []
    with db.get_engine(db_url).connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                parts.extend(
                    bytes(v).decode("utf-8", "replace") if isinstance(v, bytes | memoryview) else str(v) for v in row
                )
    return "\n".join(parts)


@pytest.fixture
def news(cm: Cm) -> Cm:
    cm("group create news")
    return cm


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-big-endian", "latin-1"])
def test_forget_takes_the_address_out_of_queued_and_failed_uploads(
    news: Cm, db_url: str, tmp_path: Path, encoding: str
) -> None:
    rows = [
        "email,name,note",
        "bob@example.com,Bob,hi",
        '"ADA@Example.com","Ada\nLovelace",secret',  # her row, two lines long, spelled otherwise
        "carl@example.com,Carl,friend of ada@example.com",  # a mention in someone else's row
        "dora@example.com,Dóra,ok",
    ]
    path = tmp_path / "people.csv"
    text = "\n".join(rows) + "\n"
    if encoding == "utf-16-big-endian":  # a BOM saying so, as Excel on a Mac may write
        encoding = "utf-16"
        path.write_bytes(codecs.BOM_UTF16_BE + text.encode("utf-16-be"))
    else:
        path.write_bytes(text.encode(encoding))
    extra = ["--encoding", encoding]
    queued = int(news(["group", "add-recipients", "news", "--csv", str(path), *extra]).stdout)
    cancelled = int(news(["group", "add-recipients", "news", "--csv", str(path), *extra]).stdout)
    news(f"jobs cancel {cancelled}")
    before = len(_staged(db_url, queued))

    run = news("recipient forget ada@example.com --json")  # an address no recipient holds yet
    assert run.json()["id"] is None and run.json()["staged_uploads"] == 2
    assert "ada" not in run.stderr.lower()
    for job in (queued, cancelled):
        text = _staged(db_url, job).decode(encoding)
        assert len(_staged(db_url, job)) == before  # rewritten in place
        assert "ada" not in text.lower() and "lovelace" not in text.lower() and "secret" not in text
        assert "bob@example.com,Bob,hi" in text and "carl@example.com,Carl,friend of " in text

    news("worker --drain")  # the queued import runs: she is not created, and the line numbers held
    counts = news(f"jobs show {queued} --json").json()["counts"]
    assert (counts["created"], counts["invalid"]) == (3, 0)
    assert sorted(r["email"] for r in news("recipient list --json").json()) == [
        "bob@example.com",
        "carl@example.com",
        "dora@example.com",
    ]
    assert news("recipient show carl@example.com --json").json()["attributes"]["note"].rstrip() == "friend of"
    assert "ada@example.com" not in _database_text(db_url).lower()


def test_an_address_forgotten_during_an_import_is_not_created(
    news: Cm, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import had already read her row when she was forgotten: its next segment finds the new suppression."""
    small_segments(monkeypatch, 50)
    lines = ["email,name"] + [f"p{i}@example.com,P{i}" for i in range(200)]
    lines[150] = "eve@example.com," + "E" * 201  # her row is also rejected: that reject must not keep her address
    lines[160] = "eve@example.com,Eve"
    path = tmp_path / "people.csv"
    path.write_text("\n".join(lines) + "\n")
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout)
    forgotten = threading.Event()

    def forget_eve(done: int, total: int) -> None:
        if not forgotten.is_set() and done > 0:  # her rows are parsed (the file is one chunk) and staged later
            forgotten.set()
            news("recipient forget eve@example.com")

    assert runner.attempt_job(db_url, job_id, worker="w", progress=forget_eve).outcome == runner.Outcome.DONE
    counts = news(f"jobs show {job_id} --json").json()["counts"]
    assert counts["suppressed"] == 1 and counts["created"] == 198, counts
    assert "eve@example.com" not in _database_text(db_url).lower()
    assert hashlib.sha256(b"eve@example.com").hexdigest() in _database_text(db_url)


def test_forget_then_opt_in_shows_no_old_free_text(news: Cm) -> None:
    news("recipient create ada@example.com --name 'Ada L'")
    news("recipient opt-out ada@example.com --reason 'my husband reads my mail'")
    news("recipient forget ada@example.com")
    news("recipient opt-in ada@example.com --reason 'signed up again'")
    exported = news("recipient export ada@example.com").json()
    assert "husband" not in str(exported)
    assert [e["reason"] for e in exported["consent_history"]] == [None, None, "signed up again"]
