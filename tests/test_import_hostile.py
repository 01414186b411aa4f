"""Bad values and hostile files: one row's problem stays that row's problem, on SQLite and PostgreSQL alike, and what
cm writes back (rejects) cannot hurt the reader."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from campaign_manager import limits
from conftest import CM_BIN, Run, assert_error

Cm = Callable[..., Run]


def _write(tmp_path: Path, content: str | bytes, name: str = "people.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _import(cm: Cm, path: Path, *extra: str) -> dict[str, object]:
    run = cm(["group", "add-recipients", "news", "--csv", str(path), "--wait", "--json", *extra])
    data: dict[str, object] = run.json()
    assert data["status"] == "done" and data["attempts"] == 1, data
    return data


def _rejects(cm: Cm, job_id: object) -> list[list[str]]:
    return list(csv.reader(io.StringIO(cm(f"jobs show {job_id} --rejects").stdout)))[1:]


@pytest.fixture
def news(cm: Cm) -> Cm:
    cm("group create news")
    return cm


# -- limits -------------------------------------------------------------------------------------------------------


def test_an_over_long_value_in_a_row_is_that_rows_reject(news: Cm, tmp_path: Path) -> None:
    """PostgreSQL used to fail (and retry) the whole import on a 300-character name that SQLite took."""
    rows = [
        "email,name,note",
        "ada@example.com,Ada,fine",
        f"long@example.com,{'N' * 300},x",  # line 3: the name
        f"attr@example.com,A,{'v' * (limits.ATTRIBUTE_VALUE + 1)}",  # line 4: an attribute value
        "bob@example.com,Bob,fine",
    ]
    data = _import(news, _write(tmp_path, "\n".join(rows) + "\n"))
    assert data["counts"] == {
        "read": 4,
        "created": 2,
        "updated": 0,
        "added": 2,
        "already_member": 0,
        "duplicates": 0,
        "invalid": 2,
        "suppressed": 0,
    }
    assert [(r[0], r[1]) for r in _rejects(news, data["id"])] == [
        ("3", "the name is longer than 200 characters (300)"),
        ("4", "attribute 'note' is longer than 1,000 characters (1,001)"),
    ]
    assert sorted(m["email"] for m in news("group recipients news --json").json()) == [
        "ada@example.com",
        "bob@example.com",
    ]


def test_a_column_name_longer_than_an_attribute_key_refuses_the_file(news: Cm, tmp_path: Path) -> None:
    path = _write(tmp_path, f"email,{'k' * 101}\nada@example.com,x\n")
    assert_error(news(["group", "add-recipients", "news", "--csv", str(path)], ok=False), 2, "column 2", "100")
    assert news("jobs list --json").json() == []


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (["group", "create", "g" * 201], "group name is longer than 200"),
        (["group", "create", "g", "--description", "d" * 1001], "description is longer than 1,000"),
        (["group", "update", "news", "--name", "n" * 201], "group name is longer than 200"),
        (["recipient", "create", "a@example.com", "--name", "n" * 201], "name is longer than 200"),
        (["recipient", "create", "a@example.com", "--phone", "1" * 51], "phone number is longer than 50"),
        (["recipient", "create", "a@example.com", "--attr", f"{'k' * 101}=v"], "attribute key is longer than 100"),
        (["recipient", "create", "a@example.com", "--attr", f"k={'v' * 1001}"], "attribute 'k' is longer than 1,000"),
        (["recipient", "update", "old@example.com", "--name", "n" * 201], "name is longer than 200"),
        (["recipient", "opt-out", "old@example.com", "--reason", "r" * 501], "reason is longer than 500"),
        (["campaign", "create", "--title", "t" * 201, "--subject", "S", "--text", "x"], "title is longer than 200"),
        (["campaign", "create", "--title", "T", "--subject", "s" * 999, "--text", "x"], "subject is longer than 998"),
    ],
)
def test_an_over_long_value_is_one_error_line_and_exit_2(news: Cm, command: list[str], fragment: str) -> None:
    """The same on both databases; PostgreSQL used to print `internal error: DataError` and the SQL, exit 70."""
    news("recipient create old@example.com --name Old")
    before = (news("recipient list --json").json(), news("group list --json").json())
    assert_error(news(command, ok=False), 2, fragment)
    assert (news("recipient list --json").json(), news("group list --json").json()) == before
    assert news("campaign list --json").json() == []


# -- hostile files ------------------------------------------------------------------------------------------------


def _around(bad: str) -> str:
    """A file with good rows on both sides of `bad`, which starts on line 4."""
    return "email,name\nfirst@example.com,F\nsecond@example.com,S\n" + bad + "after@example.com,A\nlast@example.com,L\n"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param("huge@example.com," + "x" * 200_000 + "\n", "longer than 131,072 characters", id="huge-field"),
        pytest.param('quotes@example.com,"' + '""' * 200_000 + '"\n', "longer than 131,072", id="nested-quotes"),
        pytest.param("nul@example.com,N\x00L\n", "NUL byte", id="nul"),
    ],
)
def test_a_hostile_row_is_a_reject_and_the_rest_imports(news: Cm, tmp_path: Path, bad: str, reason: str) -> None:
    data = _import(news, _write(tmp_path, _around(bad)))
    assert data["counts"]["created"] == 4 and data["counts"]["invalid"] == 1  # type: ignore[index]
    [(line, why, raw)] = _rejects(news, data["id"])
    assert line == "4" and reason in why and raw.startswith(bad.split(",")[0])
    assert len(raw) <= 65_536 and ("\x00" not in raw)
    cut = len(bad) > 65_536
    assert ("only its first 65,536 characters are kept here" in why) is cut
    assert (len(raw) == 65_536) is cut


def test_a_quote_never_closed_is_one_reject_and_reading_goes_on(news: Cm, tmp_path: Path) -> None:
    swallowed = "x,y\n" * 40_000  # 160,000 characters: the quoted field passes the limit inside them
    data = _import(news, _write(tmp_path, _around('open@example.com,"never closed\n' + swallowed)))
    counts = data["counts"]
    assert counts["created"] == 4  # type: ignore[index]
    rejects = _rejects(news, data["id"])
    assert rejects[0][0] == "4" and "a quote never closed?" in rejects[0][1] and rejects[0][2].startswith("open@")
    # What the runaway field swallowed is the reject; the lines after the limit are read as rows again.
    assert all(r[2] == "x,y" for r in rejects[1:]) and len(rejects) < 40_000


def test_a_50_mb_line_is_a_reject_in_bounded_memory(tmp_path: Path, sqlite_url: str) -> None:
    """A real `cm` process: the 50 MB line is never held whole (its peak RSS stays far below the line's size)."""
    path = _write(tmp_path, _around("big@example.com," + "y" * (50 << 20) + "\n"))
    env = {**os.environ, "CM_DATABASE_URL": sqlite_url}
    env.pop("CM_CONFIG", None)
    subprocess.run([str(CM_BIN), "group", "create", "news"], env=env, check=True, capture_output=True)
    # An intermediate process, so that RUSAGE_CHILDREN measures `cm` alone.
    measure = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(done.stderr)\n"
    )
    args = [str(CM_BIN), "group", "add-recipients", "news", "--csv", str(path), "--wait"]
    done = subprocess.run([sys.executable, "-c", measure, *args], env=env, capture_output=True, text=True)
    code, peak_kb = map(int, done.stdout.split())
    assert code == 0, done.stderr
    assert "created 4" in done.stderr and "invalid 1" in done.stderr
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb} KiB"


@pytest.mark.parametrize(
    ("content", "refused"),
    [
        pytest.param(b"email,na\x00me\nada@example.com,A\n", True, id="nul-in-header"),
        pytest.param(b"email,name\n" + b"a@example.com,\x00\n" * 50, True, id="nuls-over-1-percent"),
        pytest.param(b"email,name\n" + b"a@example.com,A\n" * 200 + b"b@example.com,\x00\n", False, id="one-stray-nul"),
        pytest.param("email,name\nada@example.com,Ada\n".encode("utf-16"), False, id="utf-16"),
    ],
)
def test_binary_files_are_refused_but_a_stray_nul_is_not(
    news: Cm, tmp_path: Path, content: bytes, refused: bool
) -> None:
    path = _write(tmp_path, content)
    extra = ["--encoding", "utf-16"] if content.startswith(b"\xff\xfe") else []
    run = news(["group", "add-recipients", "news", "--csv", str(path), "--wait", *extra], ok=not refused)
    if refused:
        assert_error(run, 2, "binary data")
        assert news("jobs list --json").json() == []
    else:
        assert news("jobs list --json").json()[0]["status"] == "done"


def test_a_file_with_no_line_break_in_64_kib_is_refused(news: Cm, tmp_path: Path) -> None:
    path = _write(tmp_path, "email," + "h" * 70_000)
    assert_error(news(["group", "add-recipients", "news", "--csv", str(path)], ok=False), 2, "no line break")


# -- what cm writes back ------------------------------------------------------------------------------------------


FORMULAS = ['=HYPERLINK("http://evil.example","x")', "=cmd|' /C calc'!A0", "@SUM(1+1)", "+44 20 7946 0000", "-3"]


def test_rejects_neutralise_formulas_and_round_trip(news: Cm, tmp_path: Path) -> None:
    """OWASP's rule: a cell starting with = + - @ tab or CR is written behind a '; the import removes exactly that
    ', so importing the rejects file unchanged gives the same rejects, and a phone number comes back as it was."""
    rows = [["email", "name", "phone", "note"]]
    rows += [[f"bad{i}", formula, "+44 20 7946 0000", "two\nlines"] for i, formula in enumerate(FORMULAS)]
    rows += [["tab@example.com", "\tTabbed", "+1 555 0100", "n" * 1_001]]  # valid address, an over-long note
    rows += [["ok@example.com", "'=kept as typed", "'+44 1", "'plain"]]  # an import of a spreadsheet's own text
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    first = _import(news, _write(tmp_path, out.getvalue()))
    ok = news("recipient show ok@example.com --json").json()
    assert ok["name"] == "=kept as typed" and ok["attributes"] == {"phone": "+44 1", "note": "'plain"}

    listed = news(f"jobs show {first['id']} --rejects").stdout
    for cell in list(csv.reader(io.StringIO(listed)))[1:]:
        assert not cell[1].startswith(("=", "+", "-", "@", "\t", "\r")) and not cell[2].startswith(("=", "+", "-", "@"))
    target = tmp_path / "fix.csv"
    news(f"jobs show {first['id']} --rejects-file {target}")
    written = list(csv.reader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert written[0] == rows[0]
    for original, cells in zip(rows[1:-1], written[1:], strict=True):
        assert cells == [("'" + c if c.startswith(("=", "+", "-", "@", "\t")) else c) for c in original]

    second = _import(news, target)
    assert second["counts"]["invalid"] == first["counts"]["invalid"] == 6  # type: ignore[index]
    assert [r[1] for r in _rejects(news, second["id"])] == [r[1] for r in _rejects(news, first["id"])]
    # What the rejects file held is the original: fixing the address is all it takes.
    fixed = target.read_text(encoding="utf-8").replace("bad3,", "fixed@example.com,")
    _import(news, _write(tmp_path, fixed, "fixed.csv"))
    person = news("recipient show fixed@example.com --json").json()
    assert person["name"] == "+44 20 7946 0000" and person["attributes"]["phone"] == "+44 20 7946 0000"
    assert person["attributes"]["note"] == "two\nlines"


def test_a_rejects_file_leaves_out_rows_too_long_to_keep(news: Cm, tmp_path: Path) -> None:
    data = _import(news, _write(tmp_path, _around("huge@example.com," + "x" * 200_000 + "\nbad,row\n")))
    target = tmp_path / "fix.csv"
    run = news(f"jobs show {data['id']} --rejects-file {target}")
    assert "wrote 1 rejected rows" in run.stderr and "1 too long to keep whole are left out" in run.stderr
    assert list(csv.reader(io.StringIO(target.read_text()))) == [["email", "name"], ["bad", "row"]]


def test_the_readme_lists_every_limit() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Limits", 1)[1].split("\n## ", 1)[0]
    for value in limits.LABELS.values():
        assert f"| {value:,} " in section or f"| {value:,}\n" in section, value
