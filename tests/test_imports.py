"""CSV imports: the file shapes people really have, what happens to every row, and refusals before queueing."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from campaign_manager.audience.address_keys import email_hash
from campaign_manager.imports import parse as import_parse
from campaign_manager.imports import service as imports
from campaign_manager.imports.csvfile import inspect_csv
from campaign_manager.imports.rows import Reject, StagedRow, create_table
from campaign_manager.jobs import runner
from conftest import Run, small_segments

GOOD = "ada@example.com"


def _write(tmp_path: Path, content: str | bytes, name: str = "people.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _import(cm: Callable[..., Run], path: Path | str, *extra: str, group: str = "news") -> dict[str, int]:
    run = cm(["group", "add-recipients", group, "--csv", str(path), "--wait", "--json", *extra])
    data = run.json()
    assert data["status"] == "done", data
    return dict(data["counts"])


@pytest.fixture
def news(cm: Callable[..., Run]) -> Callable[..., Run]:
    cm("group create news")
    return cm


@pytest.fixture(params=["one-segment", "many-segments"])
def segments(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test with the whole file in one segment, and with segments of two addresses read in batches of one:
    the counts must come out the same whatever the segments and batches."""
    if request.param == "many-segments":
        small_segments(monkeypatch, 2, batch_rows=1)


@pytest.mark.parametrize(
    ("content", "extra"),
    [
        pytest.param("email,name\nada@example.com,Ada\nbob@example.com,Bob\n", (), id="plain"),
        pytest.param("\ufeffEmail;Name\r\nada@example.com;Ada\r\nbob@example.com;Bob\r\n", (), id="bom-crlf-semicolon"),
        pytest.param("E-mail\tName\nada@example.com\tAda\nbob@example.com\tBob\n", (), id="tab-e-mail"),
        pytest.param("Email Address|name\nada@example.com|Ada\n\n\nbob@example.com|Bob\n", (), id="pipe-blank-lines"),
        pytest.param(
            'name,Primary Email\n"Lovelace, Ada",ada@example.com\n"Bob\nthe builder",bob@example.com\n',
            (),
            id="quoted-delimiter-and-newline",
        ),
        pytest.param("who,addr\nAda,ada@example.com\nBob,bob@example.com\n", ("--email-column", "addr"), id="column"),
        pytest.param(
            "email;name\nada@example.com;Ada\nbob@example.com;Bob\n", ("--delimiter", ";"), id="explicit-delimiter"
        ),
    ],
)
def test_csv_shapes(news: Callable[..., Run], tmp_path: Path, content: str, extra: tuple[str, ...]) -> None:
    counts = _import(news, _write(tmp_path, content), *extra)
    assert counts["read"] == 2 and counts["created"] == 2 and counts["added"] == 2 and counts["invalid"] == 0
    members = news("group recipients news --json").json()
    assert sorted(m["email"] for m in members) == ["ada@example.com", "bob@example.com"]


def test_latin1_with_encoding(news: Callable[..., Run], tmp_path: Path) -> None:
    path = _write(tmp_path, "email,name,city\nzoe@example.com,Zoé,Besançon\n".encode("latin-1"))
    news(["group", "add-recipients", "news", "--csv", str(path)], ok=False)  # not UTF-8: refused
    assert news("jobs list --json").json() == []
    counts = _import(news, path, "--encoding", "latin-1")
    assert counts["created"] == 1
    person = news("recipient show zoe@example.com --json").json()
    assert person["name"] == "Zoé" and person["attributes"] == {"city": "Besançon"}


def test_every_row_accounted_for(news: Callable[..., Run], tmp_path: Path, segments: None) -> None:
    news("recipient create old@example.com --name Old --attr plan=free")
    news("recipient create gone@example.com")
    news("recipient forget gone@example.com")
    news("recipient opt-out out@example.com")
    news("group add-recipients news --email member@example.com")
    rows = [
        "email,name,plan,city",
        "new@example.com,New,pro,Paris",  # 2 created
        "NEW@example.com,Dup,free,Rome",  # 3 duplicate (case)
        "not-an-email,X,pro,",  # 4 invalid
        "old@example.com,Renamed,pro,",  # 5 existing: added, stored data kept
        "gone@example.com,G,pro,",  # 6 forgotten: suppressed
        "out@example.com,O,pro,",  # 7 opted out: suppressed
        "member@example.com,M,pro,",  # 8 already in the group
        ",nobody,pro,",  # 9 invalid (empty)
        "short@example.com",  # 10 short row: still fine
    ]
    counts = _import(news, _write(tmp_path, "\n".join(rows) + "\n"))
    assert counts == {
        "read": 9,
        "created": 2,
        "updated": 0,
        "added": 3,
        "already_member": 1,
        "duplicates": 1,
        "invalid": 2,
        "suppressed": 2,
    }
    new = news("recipient show new@example.com --json").json()
    assert new["name"] == "New" and new["attributes"] == {"plan": "pro", "city": "Paris"}  # the first line wins
    old = news("recipient show old@example.com --json").json()
    assert old["name"] == "Old" and old["attributes"] == {"plan": "free"}  # kept without --update-existing
    out = news("recipient show out@example.com --json").json()
    assert out["status"] == "opted_out" and out["groups"] == []
    assert news("recipient show gone@example.com", ok=False).exit_code == 3

    job_id = news("jobs list --json").json()[0]["id"]
    rejects = news(f"jobs show {job_id} --rejects").stdout
    assert "line" in rejects and "4" in rejects and "not-an-email" in rejects and "9" in rejects
    target = tmp_path / "rejects.csv"
    news(f"jobs show {job_id} --rejects-file {target}")
    fixed = list(csv.reader(io.StringIO(target.read_text())))
    assert fixed == [["email", "name", "plan", "city"], ["not-an-email", "X", "pro", ""], ["", "nobody", "pro", ""]]


def test_stored_spelling_and_attributes(news: Callable[..., Run], tmp_path: Path) -> None:
    """Each address is stored as email-validator normalizes it (the domain lowercased, the local part kept, role
    names lowercased); attributes keep every character, and empty cells add no attribute."""
    rows = [
        ["email", "name", "note", "city"],
        ["Ada@Example.COM", "Ada", 'says "hi", \\ and\nbye', "Zürich 😀"],
        ["bob@example.com", "Bob", "", "Rome"],
        ["Postmaster@Example.org", "", "", ""],
        ["José@Example.com", "José", "ok", ""],
    ]
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    counts = _import(news, _write(tmp_path, out.getvalue()))
    assert counts["created"] == 4 and counts["invalid"] == 0
    members = {m["email"]: m for m in news("group recipients news --json").json()}
    assert sorted(members) == ["Ada@example.com", "José@example.com", "bob@example.com", "postmaster@example.org"]
    shown = {e: news(["recipient", "show", e.upper(), "--json"]).json()["attributes"] for e in members}
    assert shown == {
        "Ada@example.com": {"note": 'says "hi", \\ and\nbye', "city": "Zürich 😀"},
        "bob@example.com": {"city": "Rome"},
        "postmaster@example.org": {},
        "José@example.com": {"note": "ok"},
    }


def test_json_objects_match_json_dumps() -> None:
    cells = ["", "plain", 'q"uote', "back\\slash", "new\nline", "tab\t", "é😀", "\x00", " "]
    columns = [(0, "a"), (1, 'we"ird'), (2, "ü")]
    rows = [[x, y, z] for x in cells for y in cells for z in cells[::2]]
    by_column = [(name, [r[i] for r in rows]) for i, name in columns]
    got = [json.loads(text) for text in import_parse.json_columns(by_column, len(rows))]
    assert got == [{name: r[i] for i, name in columns if r[i]} for r in rows]
    assert import_parse.json_columns([], 3) == ["{}"] * 3


def test_the_parser_makes_typed_rows() -> None:
    """What the parser stages for each row: the key, the address only where it differs from it, whether SQL
    still lowercases its domain, the forgotten flag; rejects with their line and reason."""
    data = "email,name,city\nAda@Example.COM,Ada,Paris\nbob@example.com,,\nJosé@Example.com,J,Rome\nnope,N,x\n"
    layout = inspect_csv(data.encode(), name="x.csv")
    forgotten = {email_hash("bob@example.com")}
    (batch,) = import_parse.parse(layout, iter([data.encode()]), forgotten, 100)
    assert batch.read == 4 and batch.rows == [
        StagedRow(2, "ada@example.com", "Ada@Example.COM", "Ada", 0, 0, '{"city":"Paris"}'),
        StagedRow(3, "bob@example.com", None, None, 1, 0, "{}"),
        StagedRow(4, "josé@example.com", "José@example.com", "J", 0, 1, '{"city":"Rome"}'),
    ]
    assert all(type(row) is StagedRow for row in batch.rows)
    assert [(r.line, r.raw) for r in batch.rejects] == [(5, "nope,N,x")] and type(batch.rejects[0]) is Reject


def test_the_staging_tables_follow_the_row_types() -> None:
    assert create_table("cm_staged", StagedRow) == (
        "CREATE TEMP TABLE cm_staged (line INTEGER NOT NULL, key TEXT NOT NULL, email TEXT, name TEXT,"
        " gone INTEGER NOT NULL, normalized INTEGER NOT NULL, attributes TEXT NOT NULL)"
    )
    assert create_table("cm_rejects", Reject, first="pos INTEGER PRIMARY KEY", constraint="UNIQUE (line)") == (
        "CREATE TEMP TABLE cm_rejects (pos INTEGER PRIMARY KEY, line INTEGER NOT NULL, raw TEXT NOT NULL,"
        " reason TEXT NOT NULL, UNIQUE (line))"
    )

    class Odd(NamedTuple):
        share: float

    with pytest.raises(TypeError, match=r"Odd\.share"):
        create_table("odd", Odd)


def test_update_existing(news: Callable[..., Run], tmp_path: Path, segments: None) -> None:
    news("recipient create old@example.com --name Old --attr plan=free --attr keep=yes")
    # With two-row segments, the second spelling of old@ falls in the next segment: it must not win.
    content = "email,name,plan\nnew@example.com,New,x\nold@example.com,New Name,pro\nOLD@example.com,Second,x\n"
    path = _write(tmp_path, content)
    counts = _import(news, path, "--update-existing")
    assert counts["updated"] == 1 and counts["created"] == 1 and counts["duplicates"] == 1
    old = news("recipient show old@example.com --json").json()
    assert old["name"] == "New Name" and old["attributes"] == {"plan": "pro", "keep": "yes"}
    assert _import(news, path, "--update-existing")["updated"] == 0  # nothing left to change


def test_campaign_recipients_csv(cm: Callable[..., Run], tmp_path: Path) -> None:
    cm("recipient opt-out out@example.com")
    path = _write(tmp_path, "email\nada@example.com\nbob@example.com\nout@example.com\nnope\n")
    run = cm(f"campaign create --title T --subject S --text hi --wait --json --recipients-csv {path}")
    created = run.json()  # the campaign, with the import that filled its audience
    assert created["audience"] == 2 and created["import"]["status"] == "done"
    assert created["import"]["counts"]["added"] == 2 and created["import"]["counts"]["suppressed"] == 1
    assert cm(f"jobs show {created['job_id']} --json").json()["counts"] == created["import"]["counts"]
    campaign = cm("campaign list --json").json()[0]
    assert campaign["audience"] == 2 and campaign["id"] == created["id"]


def test_stdin(news: Callable[..., Run]) -> None:
    run = news("group add-recipients news --csv - --wait --json", input="email\nada@example.com\n")
    assert run.json()["counts"]["created"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "file not found", id="missing"),
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a csv", id="binary"),
        pytest.param(b"name,city\nAda,London\n", "no email column", id="no-email-column"),
        pytest.param(b"email\nada@example.com\n\xff\xfe broken\n", "not valid utf-8", id="undecodable"),
    ],
)
def test_refused_before_queueing(news: Callable[..., Run], tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "in.csv" if content is None else _write(tmp_path, content)
    run = news(["group", "add-recipients", "news", "--csv", str(path)], ok=False)
    assert run.exit_code == 2
    assert message in run.stderr.lower() and run.stderr.startswith("error:") and "Traceback" not in run.stderr
    assert news("jobs list --json").json() == []


def test_unknown_group_refused(news: Callable[..., Run], tmp_path: Path) -> None:
    run = news(["group", "add-recipients", "nope", "--csv", str(_write(tmp_path, "email\na@example.com\n"))], ok=False)
    assert run.exit_code == 3 and news("jobs list --json").json() == []


def test_file_not_needed_after_queueing_and_rerun_is_idempotent(
    news: Callable[..., Run], db_url: str, tmp_path: Path
) -> None:
    path = _write(tmp_path, "email,name\n" + "".join(f"p{i}@example.com,P{i}\n" for i in range(50)))
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout.strip())
    path.unlink()
    first = imports.run_import_job(db_url, job_id)
    assert first["created"] == 50
    # A second run (a worker that died after committing, say) changes nothing and reports the same counts.
    assert imports.run_import_job(db_url, job_id) == first
    assert news("group show news --json").json()["members"] == 50


def test_uncommitted_run_starts_over(news: Callable[..., Run], db_url: str, tmp_path: Path) -> None:
    """A run that dies before its transaction commits leaves nothing behind: the next run does it all."""
    path = _write(tmp_path, "email\n" + "".join(f"p{i}@example.com\n" for i in range(20_000)))
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout.strip())

    def die(done: int, total: int) -> None:
        raise runner.JobReleased

    with pytest.raises(runner.JobReleased):
        imports.run_import_job(db_url, job_id, die)
    assert news("group show news --json").json()["members"] == 0
    assert imports.run_import_job(db_url, job_id)["created"] == 20_000


def test_queued_import_through_the_worker(news: Callable[..., Run], tmp_path: Path) -> None:
    """The real path: queue with --csv (returns at once), the real Huey queue, drained by the real worker."""
    path = _write(tmp_path, "email,name\nada@example.com,Ada\nbad\nbob@example.com,Bob\n")
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(path)]).stdout.strip())
    assert news(f"jobs show {job_id} --json").json()["status"] == "queued"
    assert news("group show news --json").json()["members"] == 0
    news("worker --drain")
    job = news(f"jobs show {job_id} --json").json()
    assert job["status"] == "done" and job["finished_at"] is not None and job["error"] is None
    assert job["counts"]["created"] == 2 and job["counts"]["invalid"] == 1
    assert news("group show news --json").json()["members"] == 2


def test_reject_line_numbers_count_quoted_line_breaks(news: Callable[..., Run], tmp_path: Path) -> None:
    content = (
        'email,note\nada@example.com,"two\nlines"\n\nbad-one,x\nbob@example.com,"three\r\nline\rbreaks"\nbad-two,y\n'
    )
    _import(news, _write(tmp_path, content))
    job_id = news("jobs list --json").json()[0]["id"]
    rows = list(csv.reader(io.StringIO(news(f"jobs show {job_id} --rejects").stdout)))
    assert [(r[0], r[2]) for r in rows[1:]] == [("5", "bad-one,x"), ("9", "bad-two,y")]


def test_forget_purges_rejected_rows_that_name_the_person(news: Callable[..., Run], tmp_path: Path) -> None:
    news("recipient create ada@example.com")
    _import(news, _write(tmp_path, "email,note\nada@example.com,ok\n<ADA@example.com>,typo\nbob,x\n"))
    job_id = news("jobs list --json").json()[0]["id"]
    assert "ADA@example.com" in news(f"jobs show {job_id} --rejects").stdout
    news("recipient forget ada@example.com")
    rejects = news(f"jobs show {job_id} --rejects").stdout
    assert "ada@example.com" not in rejects.lower() and "bob" in rejects


def test_queued_from_stdin_and_into_a_campaign(news: Callable[..., Run]) -> None:
    """The queued paths of `--csv -` and `--recipients-csv`: each returns a job id at once; the worker runs both."""
    group_job = int(news("group add-recipients news --csv -", input="email\nada@example.com\n").stdout.strip())
    run = news("campaign create --title T --subject S --text hi --recipients-csv -", input="email\nbob@example.com\n")
    # The command made a campaign: its id on stdout (as without a file), the job's on stderr.
    campaign_id = int(run.stdout.strip())
    campaign_job = next(job["id"] for job in news("jobs list --json").json() if job["id"] != group_job)
    assert f"queued import job {campaign_job}" in run.stderr and f"created campaign {campaign_id}" in run.stderr
    assert news(f"campaign show {campaign_id} --json").json()["audience"] == 0
    assert {news(f"jobs show {job} --json").json()["status"] for job in (group_job, campaign_job)} == {"queued"}
    news("worker --drain")
    assert news("group show news --json").json()["members"] == 1
    assert news("campaign list --json").json()[0]["audience"] == 1


def test_wait_shows_no_progress_bar_when_stderr_is_not_a_terminal(news: Callable[..., Run], tmp_path: Path) -> None:
    run = news(["group", "add-recipients", "news", "--csv", str(_write(tmp_path, "email\na@example.com\n")), "--wait"])
    assert "importing" not in run.stderr and "\x1b[" not in run.stderr  # no bar, no terminal codes
    assert "created 1" in run.stderr  # the summary still goes to stderr


def test_a_quote_never_closed_is_one_cut_reject_and_reading_goes_on(
    news: Callable[..., Run], db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quote never closed swallows the lines after it into one field, past the reader's limit: that record is one
    reject (cut, with its line), and reading goes on after it, across batches."""
    monkeypatch.setattr(imports, "BATCH_ROWS", 7)
    rows = "".join(f"q{i}@example.com,Q{i}\n" for i in range(30)) + 'r@example.com,"open\n' + "x,y\n" * 50_000
    counts = _import(news, _write(tmp_path, "email,name\n" + rows + "last@example.com,L\n"))
    assert counts["created"] == 31 and counts["read"] > 31  # the 30 before it, and the last row after it
    job_id = news("jobs list --json").json()[0]["id"]
    first = list(csv.reader(io.StringIO(news(f"jobs show {job_id} --rejects").stdout)))[1]
    assert first[0] == "32" and "longer than 131,072 characters" in first[1] and "first 65,536" in first[1]
    assert first[2].startswith('r@example.com,"open') and len(first[2]) == 65_536
    assert news("group show news --json").json()["members"] == 31

    # A worker giving the job back (its progress callback raises) while it reads: the next run does it all.
    good = "email,name\n" + "".join(f"p{i}@example.com,P{i}\n" for i in range(100)) + "bad,x\n"
    job_id = int(news(["group", "add-recipients", "news", "--csv", str(_write(tmp_path, good))]).stdout.strip())

    def give_back(done: int, total: int) -> None:
        raise runner.JobReleased

    with pytest.raises(runner.JobReleased):
        imports.run_import_job(db_url, job_id, give_back)
    assert news("group show news --json").json()["members"] == 31
    counts = imports.run_import_job(db_url, job_id)
    assert counts["created"] == counts["added"] == 100 and counts["invalid"] == 1
