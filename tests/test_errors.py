"""Bad input: one `error:` line on stderr, the documented exit code, no traceback, and nothing changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from campaign_manager import errors
from conftest import Run, assert_error, make_cm

Cm = Callable[..., Run]


def _snapshot(cm: Cm) -> tuple[Any, ...]:
    return tuple(cm(f"{noun} list --json").json() for noun in ("recipient", "group", "campaign"))


@pytest.mark.parametrize(
    ("command", "exit_code", "message"),
    [
        ("recipient create not-an-email", errors.InvalidInput.exit_code, "@-sign"),
        ("recipient create ada@example", errors.InvalidInput.exit_code, "period"),
        ("recipient create new@example.com --group news --group nope", errors.NotFound.exit_code, "no group 'nope'"),
        ("recipient create new@example.com --attr city", errors.InvalidInput.exit_code, "malformed --attr 'city'"),
        ("recipient create new@example.com --attr =x", errors.InvalidInput.exit_code, "KEY=VALUE"),
        ("recipient create new@example.com --phone call-me", errors.InvalidInput.exit_code, "phone"),
        ("recipient create ada@example.com", errors.Conflict.exit_code, "already exists"),
        ("recipient update ada@example.com --name X --attr nokey", errors.InvalidInput.exit_code, "malformed --attr"),
        ("recipient update ada@example.com --name X --add-group nope", errors.NotFound.exit_code, "no group"),
        ("recipient update ada@example.com --name X --remove-group nope", errors.NotFound.exit_code, "no group"),
        ("recipient update nobody@example.com --name X", errors.NotFound.exit_code, "no recipient"),
        ("recipient show 999", errors.NotFound.exit_code, "no recipient '999'"),
        ("recipient show nobody@example.com", errors.NotFound.exit_code, "no recipient"),
        ("recipient list --active --opted-out", errors.InvalidInput.exit_code, "exclude each other"),
        ("recipient list --group nope", errors.NotFound.exit_code, "no group"),
        ("recipient list --limit -1", errors.InvalidInput.exit_code, "negative"),
        ("recipient opt-out not-an-email", errors.InvalidInput.exit_code, "@-sign"),
        ("recipient opt-in nobody@example.com", errors.NotFound.exit_code, "no recipient"),
        ("recipient forget 999", errors.NotFound.exit_code, "no recipient '999'"),
        ("recipient export 999", errors.NotFound.exit_code, "no recipient"),
        ("group create news", errors.Conflict.exit_code, "already exists"),
        ("group create 123", errors.InvalidInput.exit_code, "digits"),
        ("group create ' '", errors.InvalidInput.exit_code, "empty"),
        ("group update vip --name news", errors.Conflict.exit_code, "already exists"),
        ("group update nope --description x", errors.NotFound.exit_code, "no group"),
        ("group delete nope", errors.NotFound.exit_code, "no group"),
        ("group show 999", errors.NotFound.exit_code, "no group '999'"),
        ("group add-recipients nope --email new@example.com", errors.NotFound.exit_code, "no group"),
        ("group add-recipients news", errors.InvalidInput.exit_code, "--email"),
        ("group remove-recipients nope --email ada@example.com", errors.NotFound.exit_code, "no group"),
        ("group recipients nope", errors.NotFound.exit_code, "no group"),
        ("campaign create --title t --subject s --text-file missing.txt", errors.InvalidInput.exit_code, "missing.txt"),
        ("campaign create --title t --subject s --text x --html-file gone.html", errors.InvalidInput.exit_code, "gone"),
        ("campaign create --title t --subject s --text-file .", errors.InvalidInput.exit_code, "--text-file"),
        ("campaign create --title t --subject s --text-file latin1.txt", errors.InvalidInput.exit_code, "UTF-8"),
        ("campaign create --title t --subject s", errors.InvalidInput.exit_code, "exactly one of"),
        ("campaign create --title t --subject s --text x --text-file b.txt", errors.InvalidInput.exit_code, "one of"),
        ("campaign create --title t --subject s --text ' '", errors.InvalidInput.exit_code, "empty"),
        ("campaign create --title ' ' --subject s --text x", errors.InvalidInput.exit_code, "non-empty"),
        ("campaign create --title t --subject $'a\\nb' --text x", errors.InvalidInput.exit_code, "one line"),
        ("campaign create --title t --subject s --text x --from nope", errors.InvalidInput.exit_code, "@-sign"),
        ("campaign create --title t --subject s --text x --group news --group nope", errors.NotFound.exit_code, "nope"),
        ("campaign create --title t --subject s --text x --recipient nobody@example.com", 3, "no recipient"),
        ("campaign show 999", errors.NotFound.exit_code, "no campaign '999'"),
        ("campaign show first", errors.NotFound.exit_code, "no campaign"),
    ],
)
def test_bad_input_changes_nothing(cm: Cm, tmp_path: Path, command: str, exit_code: int, message: str) -> None:
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "b.txt").write_text("body", encoding="utf-8")
    cm("group create news")
    cm("group create vip")
    cm("recipient create ada@example.com --name Ada --group news")
    cm("campaign create --title first --subject s --text x --group news")
    before = _snapshot(cm)
    argv = command.replace("$'a\\nb'", "'a\nb'")
    assert_error(cm(argv, ok=False), exit_code, message)
    assert _snapshot(cm) == before


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["group", "create"], ["missing argument 'NAME'", "(see `cm group create --help`)"]),
        (["recipient", "show"], ["missing argument 'ID|EMAIL'", "`cm recipient show --help`"]),
        (["campaign", "create", "--text", "x"], ["missing option '--title'"]),
        (["recipient", "list", "--bogus"], ["no such option: --bogus", "`cm recipient list --help`"]),
        (["--no-such-option", "recipient", "list"], ["no such option: --no-such-option", "`cm --help`"]),
        (["recipient", "frobnicate"], ["no such command 'frobnicate'", "`cm recipient --help`"]),
        (["grup", "list"], ["no such command 'grup'; did you mean 'group'?"]),
        (["group", "craete", "news"], ["no such command 'craete'; did you mean 'create'?"]),
        (["-v"], ["missing command"]),
        (["worker", "--workers", "0"], ["invalid value for '--workers'", "greater than or equal to 1"]),
        (["jobs", "list", "--limit", "abc"], ["invalid value for '--limit'", "integer"]),
        (["recipient", "list", "--limit", "many"], ["invalid value for '--limit'"]),
        (["recipient", "list", "--limit"], ["option '--limit' requires an argument"]),
        (["group", "create", "a", "b"], ["unexpected extra argument", "(b)"]),
        (["plugins", "extra"], ["unexpected extra argument", "(extra)"]),
        # What the user typed is quoted escaped (here by Click): one line, and it cannot drive the terminal.
        (["group", "create", "a", "b\x1b[2J\nc"], ["(b\\x1b[2J\\x0ac)"]),
    ],
)
def test_usage_errors_are_one_error_line_and_exit_2(args: list[str], fragments: list[str]) -> None:
    # No database is opened: the command line is refused before anything runs.
    run = make_cm(None)(args, ok=False)
    assert_error(run, errors.InvalidInput.exit_code, *fragments)
    assert "Usage:" not in run.stderr and "Try '" not in run.stderr and "╭" not in run.stderr


def test_an_error_line_shows_what_was_given_escaped() -> None:
    args = ["campaign", "create", "--title", "t", "--subject", "s", "--text-file", "gone\x1b[2J\r.txt"]
    run = make_cm(None)(args, ok=False)
    assert_error(run, errors.InvalidInput.exit_code, "--text-file not found: gone\\x1b[2J\\r.txt")
    assert "\x1b" not in run.stderr and "\r" not in run.stderr


@pytest.mark.parametrize("args", [[], ["group"], ["jobs"]])
def test_a_command_line_without_a_command_prints_help_on_stderr_and_exits_2(args: list[str]) -> None:
    run = make_cm(None)(args, ok=False)
    assert run.exit_code == errors.InvalidInput.exit_code
    assert run.stdout == ""
    assert run.stderr.startswith(f"Usage: {' '.join(['cm', *args])} [OPTIONS] COMMAND [ARGS]...\n")
    assert "Commands:" in run.stderr and "╭" not in run.stderr


@pytest.mark.parametrize(
    "command",
    ["recipient list", "recipient create a@example.com", "group create news", "db status", "db upgrade"],
)
def test_unreachable_postgresql(command: str) -> None:
    # Port 1 on localhost: nothing listens there, so the connection is refused at once.
    cm = make_cm("postgresql://cm:s3cret@127.0.0.1:1/cm")
    run = cm(command, ok=False)
    assert_error(run, errors.DatabaseError.exit_code, "cannot open database", "127.0.0.1:1", "refused")
    assert "s3cret" not in run.stderr  # the password is masked


@pytest.mark.parametrize("where", ["under-a-file", "missing-dir-in-proc", "unsupported-url"])
@pytest.mark.parametrize("command", ["recipient list", "group create news", "db status", "db upgrade"])
def test_unusable_database_location(tmp_path: Path, where: str, command: str) -> None:
    (tmp_path / "plain-file").write_text("not a folder")
    url = {
        "under-a-file": str(tmp_path / "plain-file" / "cm.db"),
        "missing-dir-in-proc": "/proc/no-such-dir/cm.db",
        "unsupported-url": "mysql://localhost/cm",
    }[where]
    run = make_cm(url)(command, ok=False)
    assert_error(run, errors.DatabaseError.exit_code)


def test_every_error_class_exits_with_its_exit_code() -> None:
    documented = {
        "CmError": errors.ExitCode.ERROR,
        "InvalidInput": errors.ExitCode.INVALID_INPUT,
        "NotFound": errors.ExitCode.NOT_FOUND,
        "Conflict": errors.ExitCode.CONFLICT,
        "ConsentError": errors.ExitCode.CONSENT,
        "DatabaseError": errors.ExitCode.DATABASE,
        "ConfigError": errors.ExitCode.CONFIG,
        "QueueError": errors.ExitCode.QUEUE,
        "JobFailed": errors.ExitCode.JOB_FAILED,
    }
    assert {name: getattr(errors, name).exit_code for name in documented} == documented
    assert [int(documented[name]) for name in documented] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    # Every CmError subclass takes its code from ExitCode, and none is left out of the list above.
    classes = {name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, errors.CmError)}
    assert classes == set(documented)
    assert all(type(getattr(errors, name).exit_code) is errors.ExitCode for name in classes)


def _readme_exit_codes() -> dict[int, str]:
    """The README's exit-code table (the one under "## Exit codes"): code -> the meaning's first words (up to a
    colon)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[:2] == ["| code | meaning |", "| --- | --- |"], "the table's header changed: update this test"
    table: dict[int, str] = {}
    for row in rows[2:]:
        code, meaning = (cell.strip() for cell in row.strip("|").split("|", 1))
        assert int(code) not in table, f"exit code {code} is listed twice"
        table[int(code)] = meaning.split(":", 1)[0]
    return table


def test_the_readme_lists_every_exit_code_and_nothing_else() -> None:
    assert _readme_exit_codes() == {int(code): code.meaning for code in errors.ExitCode}
    assert errors.ExitCode.INVALID_INPUT == 2  # usage errors share it (test_cli checks they exit 2)


def test_an_unexpected_error_is_one_line_and_exit_70(cm: Cm, monkeypatch: pytest.MonkeyPatch) -> None:
    from campaign_manager.audience import groups

    def broken(*_args: object, **_kwargs: object) -> list[object]:
        raise RuntimeError("something broke")

    monkeypatch.setattr(groups, "list_groups", broken)
    run = cm("group list", ok=False)
    assert run.exit_code == 70
    assert run.stderr.strip() == "internal error: RuntimeError: something broke (run with -v for details)"
    verbose = cm("-v group list", ok=False)
    assert verbose.exit_code == 70 and "Traceback" in verbose.stderr  # only when asked for
