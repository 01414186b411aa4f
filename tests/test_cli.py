"""The command line as a whole: help and examples on every command, logging, plugins, and the installed `cm`
run as a real process."""

from __future__ import annotations

import email
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import pytest
import typer

from campaign_manager import __version__, db, notifiers
from campaign_manager.cli import NOUNS, app
from conftest import CM_BIN, Run, make_cm, run_cm_process

Cm = Callable[..., Run]


def _walk() -> list[tuple[tuple[str, ...], Any]]:
    """Every command of the app, nouns included, as (path, click command); nouns load as they do at run time."""
    found: list[tuple[tuple[str, ...], Any]] = []

    def visit(command: Any, path: tuple[str, ...], ctx: Any) -> None:
        found.append((path, command))
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                visit(sub, (*path, name), typer.Context(sub, info_name=name, parent=ctx))

    root = typer.main.get_command(app)
    visit(root, (), typer.Context(root, info_name="cm"))
    return found


COMMANDS = _walk()


def test_the_walk_finds_every_noun() -> None:
    paths = {path for path, _command in COMMANDS}
    assert {(noun,) for noun in NOUNS} | {("init",)} <= paths
    for expected in [("recipient", "forget"), ("group", "add-recipients"), ("campaign", "show"), ("config", "show")]:
        assert expected in paths


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "cm" for p, _c in COMMANDS])
def test_every_command_has_help_with_an_example(path: tuple[str, ...], command: Any) -> None:
    name = " ".join(("cm", *path))
    assert command.help and "Example: cm" in command.help, f"`{name}` needs help with an `Example:` line"
    # The example uses the command it documents.
    assert f"Example: {name}" in command.help
    rendered = make_cm(None)([*path, "--help"])
    assert f"Usage: {name}" in rendered.stdout
    assert "Example:" in rendered.stdout


# Rich's panel borders: help is plain Click text everywhere.
BOX = re.compile("[╭╮╰╯│─━┃]")
# Typer's own metavars (`<str>`, `<int range>`, `{email}`): a value is named for what it is instead.
TYPE_METAVAR = re.compile(r"<[^<>\s]+(?: range)?>|\{[^{}\s]+\}")
# `PATH`, `ID|EMAIL`, `KEY=VALUE`; a choice lists its values as they are typed (`red|blue`).
VALUE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*(?:[|=][A-Za-z0-9][A-Za-z0-9_.-]*)*")


def _option_column(rendered: str, opt: str) -> list[str]:
    """The words left of an option's help (`-w, --workers N` -> ["-w", "--workers", "N"])."""
    for line in rendered.partition("\nOptions:\n")[2].splitlines():
        words = re.split(r"[ ,]+", re.split(r"\s{2,}", line.strip())[0])
        if opt in words:
            return [w for w in words if w != "/"]
    raise AssertionError(f"{opt} is not in the help")


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "cm" for p, _c in COMMANDS])
def test_help_is_plain_and_names_every_value(path: tuple[str, ...], command: Any) -> None:
    rendered = make_cm(None)([*path, "--help"]).stdout
    assert not BOX.search(rendered), rendered
    assert not TYPE_METAVAR.search(rendered), TYPE_METAVAR.findall(rendered)
    usage = rendered.splitlines()[0]
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.metavar and VALUE_NAME.fullmatch(param.metavar), (param.name, param.metavar)
            shown = param.metavar if param.required else f"[{param.metavar}]"  # an optional one is bracketed
            assert shown in usage.split(), usage
            continue
        column = _option_column(rendered, param.opts[0])
        values = [w for w in column if not w.startswith("-")]
        if param.is_flag:
            assert param.metavar is None and values == [], f"flag {param.opts} shows {values}"
        else:
            assert param.metavar and VALUE_NAME.fullmatch(param.metavar), (param.name, param.metavar)
            assert values == [param.metavar], column


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["recipient", "show"], "Usage: cm recipient show [OPTIONS] ID|EMAIL"),
        (["group", "update"], "Usage: cm group update [OPTIONS] ID|NAME"),
        (["campaign", "show"], "Usage: cm campaign show [OPTIONS] ID"),
        (["jobs", "show"], "Usage: cm jobs show [OPTIONS] ID"),
        (["group", "create"], "Usage: cm group create [OPTIONS] NAME"),
        (["plugins"], "Usage: cm plugins [OPTIONS]"),
        (["worker"], "Usage: cm worker [OPTIONS]"),
        ([], "Usage: cm [OPTIONS] COMMAND [ARGS]..."),
    ],
)
def test_usage_lines(args: list[str], usage: str) -> None:
    assert make_cm(None)([*args, "--help"]).stdout.splitlines()[0] == usage


def test_option_metavars_read_as_values() -> None:
    rendered = make_cm(None)("recipient update --help").stdout + make_cm(None)("group add-recipients --help").stdout
    for shown in (
        "--attr KEY=VALUE",
        "--add-group ID|NAME",
        "--email EMAIL",
        "--csv PATH",
        "--name NAME",
    ):
        assert shown in rendered
    assert "--config PATH" in make_cm(None)("--help").stdout
    assert "--database URL" in make_cm(None)("--help").stdout
    assert "-w, --workers N" in make_cm(None)("worker --help").stdout
    assert "--rejects-file PATH" in make_cm(None)("jobs show --help").stdout


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


def test_a_new_option_gets_a_metavar_from_its_name_or_type() -> None:
    from campaign_manager.cli._help import build

    thing = typer.Typer(name="thing")

    @thing.command("make")
    def make(
        ref: Annotated[str, typer.Argument(help="Which")],
        count: Annotated[int, typer.Option(help="How many")] = 1,
        ratio: Annotated[float, typer.Option(help="How much")] = 0.5,
        title: Annotated[str | None, typer.Option(help="A title")] = None,
        sent_at: Annotated[datetime | None, typer.Option(help="When")] = None,
        owner_email: Annotated[str | None, typer.Option(help="Who")] = None,
        tags: Annotated[list[str] | None, typer.Option("--tag", help="Repeatable")] = None,
        colour: Annotated[Colour, typer.Option(help="Which colour")] = Colour.RED,
        webhook_url: Annotated[str | None, typer.Option(help="Where")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say")] = False,
        loud: Annotated[bool, typer.Option("--loud/--quiet", help="Volume")] = False,
    ) -> None:
        """Make a thing.

        Example: cm thing make 1
        """

    @thing.command("other")
    def other() -> None:
        """Another.

        Example: cm thing other
        """

    group = build("thing", thing)
    make_command = group.get_command(typer.Context(group, info_name="thing"), "make")  # made as it is asked for
    names = {p.name: p.metavar for p in make_command.params}
    assert names == {
        "ref": "ID",
        "count": "N",
        "ratio": "NUMBER",
        "title": "TEXT",
        "sent_at": "DATETIME",
        "owner_email": "EMAIL",
        "tags": "TEXT",
        "colour": "red|blue",
        "webhook_url": "URL",
        "dry_run": None,
        "loud": None,
    }
    help_text = make_command.get_help(typer.Context(make_command, info_name="make"))
    assert not BOX.search(help_text) and not TYPE_METAVAR.search(help_text)
    assert "--tag TEXT" in help_text and re.search(r"--loud / --quiet +Volume", help_text)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "cm" for p, _c in COMMANDS])
def test_examples_stay_on_one_line(path: tuple[str, ...], command: Any) -> None:
    # Help rewraps paragraphs to the terminal, but an example is copied into a shell: it stays whole.
    lines = [line.strip() for line in make_cm(None)([*path, "--help"]).stdout.splitlines()]
    for example in re.findall(r"^Example: .*$", command.help, flags=re.MULTILINE):
        assert example.strip() in lines


def test_root_help_lists_the_nouns_without_loading_the_heavy_libraries() -> None:
    # `cm --help` must stay fast: SQLModel, SQLAlchemy, Rich and the rest load only in the commands using them.
    code = (
        "import sys\n"
        "sys.argv = ['cm', '--help']\n"
        "from campaign_manager.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = {'sqlmodel', 'sqlalchemy', 'rich', 'alembic', 'huey', 'aiosmtplib', 'email_validator', 'psycopg'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for noun in NOUNS:
        assert noun in done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def _log_records(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_json_log_lines(cm: Cm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_LOG_FORMAT", "json")
    run = cm("-v recipient opt-out ada@example.com --reason x --json")
    json.loads(run.stdout)  # stdout stays pure data
    records = _log_records(run.stderr)
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    consent = [r for r in records if r["logger"] == "campaign_manager.audience.consent"]
    assert [(r["level"], r["action"], r["source"]) for r in consent] == [("info", "opt_out", "cm recipient opt-out")]
    assert any(r["level"] == "debug" for r in records)
    # Log lines outlive `forget`, so they never carry the address.
    assert not any("ada@example.com" in json.dumps(r) for r in records)
    # Without -v only warnings and errors are logged.
    assert _log_records(cm("recipient opt-out bob@example.com").stderr) == []


def test_log_format_from_the_config_file(cm_bare: Cm, tmp_path: Path) -> None:
    (tmp_path / "campaign.toml").write_text('[log]\nformat = "json"\nlevel = "info"\n', encoding="utf-8")
    records = _log_records(cm_bare("recipient list").stderr)
    assert any("migrated" in r["message"] for r in records)


def test_text_logs_and_quiet(cm: Cm) -> None:
    verbose = cm("-v recipient opt-out ada@example.com")
    assert " INFO campaign_manager.audience.consent: consent opt_out by cm recipient opt-out" in verbose.stderr
    assert not _log_records(verbose.stderr)
    assert cm("-q recipient opt-out bob@example.com").stderr == ""
    bob = cm("recipient show bob@example.com --json").json()["id"]
    assert cm("recipient opt-out bob@example.com").stderr == f"recipient {bob} was already opted out\n"


class ThrowawaySettings(NamedTuple):
    greeting: Annotated[str, notifiers.key("what it says")] = "hello"


class Throwaway:
    """A notifier that only remembers what it was given."""

    name = "throwaway"
    config_class = ThrowawaySettings

    def __init__(self, config: ThrowawaySettings) -> None:
        self.config = config
        self.sent: list[notifiers.Message] = []

    def send_batch(self, messages: list[notifiers.Message]) -> list[notifiers.Result]:
        self.sent.extend(messages)
        return [notifiers.Result.sent(f"throwaway-{len(self.sent)}")]


def test_plugins_lists_the_builtin_outbox() -> None:
    rows = {row["name"]: row for row in make_cm(None)("plugins --json").json()}
    assert rows["outbox"]["module"] == "campaign_manager.notifiers.outbox:OutboxNotifier"
    assert (rows["outbox"]["package"], rows["outbox"]["status"]) == ("campaign-manager", "loaded")
    assert "outbox" in make_cm(None)("plugins").stdout


def test_a_registered_plugin_is_listed_until_unregistered() -> None:
    notifiers.register("throwaway", Throwaway)
    try:
        rows = {row["name"]: row for row in make_cm(None)("plugins --json").json()}
        assert (rows["throwaway"]["module"], rows["throwaway"]["status"]) == ("registered in process", "loaded")
        cls = notifiers.load_notifiers()["throwaway"]
        instance = cls(ThrowawaySettings(greeting="hi"))
        assert isinstance(instance, notifiers.Notifier)
        message = notifiers.Message(
            key="k", to="a@example.com", sender="s@example.com", envelope_from="", subject="s", text="t"
        )
        assert instance.send_batch([message]) == [notifiers.Result.sent("throwaway-1")]
    finally:
        notifiers.unregister("throwaway")
    assert "throwaway" not in notifiers.load_notifiers()
    assert "throwaway" not in [r["name"] for r in make_cm(None)("plugins --json").json()]


def test_outbox_writes_one_file_per_idempotency_key(tmp_path: Path) -> None:
    outbox_class = notifiers.load_notifiers()["outbox"]
    outbox = outbox_class(notifiers.config_class(outbox_class)(path=tmp_path / "out"))
    data = b"To: ada@example.com\r\nSubject: Hello\r\nFrom: news@example.com\r\n\r\nPlain\r\n"
    message = notifiers.Message(
        key="db1-7",
        to="ada@example.com",
        sender="news@example.com",
        envelope_from="news@example.com",
        subject="Hello",
        text="Plain",
        data=data,
        message_id="<m1@example.com>",
    )
    outbox.open()
    assert outbox.send_batch([message]) == [notifiers.Result.sent("<m1@example.com>")]
    outbox.send_batch([message])  # a retry overwrites, never duplicates
    files = list((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["db1-7.eml"]
    assert files[0].stat().st_mode & 0o777 == 0o600
    mail = email.message_from_bytes(files[0].read_bytes())
    assert (mail["To"], mail["Subject"], mail["From"]) == ("ada@example.com", "Hello", "news@example.com")


# --- the installed console script, in real processes


def _env(tmp_path: Path) -> dict[str, str]:
    db.upgrade(str(tmp_path / "proc.db"))  # a database named by CM_DATABASE_URL is made by `cm db upgrade` only
    return {
        "CM_DATABASE_URL": str(tmp_path / "proc.db"),
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
    }


def test_console_script_version(tmp_path: Path) -> None:
    assert CM_BIN.is_file()
    done = run_cm_process(["--version"], env=_env(tmp_path), cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"cm {__version__}\n", "")
    module = subprocess.run(
        [sys.executable, "-m", "campaign_manager", "--version"], capture_output=True, text=True, timeout=60
    )
    assert module.stdout == f"cm {__version__}\n"


def test_console_script_round_trip(tmp_path: Path) -> None:
    env = _env(tmp_path)
    for args in (
        ["group", "create", "news"],
        ["group", "add-recipients", "news", "--email", "Ada@Example.com", "--email", "bob@example.com"],
        ["recipient", "opt-out", "bob@example.com", "--reason", "asked"],
    ):
        done = run_cm_process(args, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    listed = run_cm_process(["recipient", "list", "--json"], env=env, cwd=tmp_path)
    people = {p["email"]: p["status"] for p in json.loads(listed.stdout)}
    assert people == {"Ada@example.com": "active", "bob@example.com": "opted_out"}
    table = run_cm_process(["group", "list"], env=env, cwd=tmp_path).stdout
    assert "news" in table
    assert (tmp_path / "proc.db").is_file()


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (["recipient", "create", "not-an-email"], 2, "@-sign"),
        (["--database", "postgresql://cm@127.0.0.1:1/cm", "recipient", "list"], 6, "cannot open database"),
        (["--config", "missing.toml", "group", "list"], 7, "config file not found: missing.toml"),
        # Usage errors take the same path in the console script as in CliRunner.
        (["group", "create"], 2, "error: missing argument 'NAME' (see `cm group create --help`)"),
        (["worker", "--workers", "0"], 2, "invalid value for '--workers'"),
        (["--bogus"], 2, "no such option: --bogus"),
    ],
)
def test_console_script_bad_input_has_no_traceback(
    tmp_path: Path, args: list[str], exit_code: int, message: str
) -> None:
    done = run_cm_process(args, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == exit_code
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert message in done.stderr


def test_console_script_json_logs(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "CM_LOG_FORMAT": "json"}
    done = run_cm_process(["-v", "group", "create", "news"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = _log_records(done.stderr)
    assert records and all(r["logger"].startswith("campaign_manager") for r in records)
    assert all(line.startswith("{") for line in done.stderr.splitlines())


# --- hostile text in what is printed for people

EVIL_NAME = "\x1b[2J evil\r"
EVIL_KEY, EVIL_VALUE = "k\x9b31m", "v\u202eg\u2066\x7f\tz\n"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # \t and \n are what a table is made of


def _shows_no_controls(text: str) -> None:
    assert not RAW.search(text), repr(text)


def test_escape_controls() -> None:
    from campaign_manager.cli._common import escape_controls

    assert escape_controls("plain café ✓") == "plain café ✓"
    assert escape_controls(EVIL_NAME) == "\\x1b[2J evil\\r"
    assert escape_controls(EVIL_VALUE) == "v\\u202eg\\u2066\\x7f\\tz\\n"
    assert escape_controls("\x00\x85\u202a\u2069 a\\b") == "\\x00\\x85\\u202a\\u2069 a\\b"


def test_tables_and_records_show_control_characters_escaped(cm: Cm) -> None:
    cm(["group", "create", "news", "--description", "line1\nline2\u202e"])
    cm(["recipient", "create", "ada@example.com", "--name", EVIL_NAME, "--attr", f"{EVIL_KEY}={EVIL_VALUE}"])
    cm("group add-recipients news --email ada@example.com")

    table = cm("recipient list").stdout  # print_table
    _shows_no_controls(table)
    assert "\\x1b[2J evil\\r" in table
    record = cm("recipient show ada@example.com").stdout  # print_record, a dict value
    _shows_no_controls(record)
    assert "k\\x9b31m=v\\u202eg\\u2066\\x7f\\tz\\n" in record
    groups = cm("group list").stdout
    _shows_no_controls(groups)
    assert "line1\\nline2\\u202e" in groups
    _shows_no_controls(cm("group recipients news").stdout)

    # --json is data: the exact strings.
    person = cm("recipient show ada@example.com --json").json()
    assert person["name"] == EVIL_NAME
    assert person["attributes"] == {EVIL_KEY: EVIL_VALUE}
    assert cm("recipient list --json").json()[0]["name"] == EVIL_NAME
    assert cm("group show news --json").json()["description"] == "line1\nline2\u202e"


def test_a_report_shows_what_was_given_escaped(cm: Cm) -> None:
    cm("group create news")
    run = cm(["group", "add-recipients", "news", "--email", "bad\x1b[31m@example.com\r"], ok=False)  # group._report
    _shows_no_controls(run.stdout)
    _shows_no_controls(run.stderr)
    assert "bad\\x1b[31m@example.com\\r" in run.stdout
    assert run.exit_code == 2
    as_json = cm(["group", "add-recipients", "news", "--email", "bad\x1b[31m@example.com\r", "--json"], ok=False)
    assert as_json.json()[0]["input"] == "bad\x1b[31m@example.com\r"


def test_a_job_shows_its_arguments_escaped(cm: Cm, tmp_path: Path) -> None:
    cm("group create news")
    path = tmp_path / "evil\x1b]0;pwned\x07.csv"
    path.write_text("email\nada@example.com\n", encoding="utf-8")
    job = cm(["group", "add-recipients", "news", "--csv", str(path), "--wait", "--json"]).json()
    shown = cm(f"jobs show {job['id']}").stdout  # render_job
    _shows_no_controls(shown)
    assert "evil\\x1b]0;pwned\\x07.csv" in shown
    assert cm(f"jobs show {job['id']} --json").json()["args"]["source"] == str(path)


def test_the_licence_is_an_spdx_expression_for_a_setuptools_that_reads_it() -> None:
    # A `{ text = ... }` table makes setuptools >= 77 print a 15-line deprecation box on every install.
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "MIT"
    setuptools = next(Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0")


@pytest.mark.parametrize("args", [["config", "show", "--json"], ["group", "show", "news"], ["group", "list"]])
def test_a_reader_that_stops_early_ends_the_output_quietly(tmp_path: Path, args: list[str]) -> None:
    """`cm ... | head`: whatever printed the output (a record, JSON, a table), a closed pipe is exit 1 and no
    "internal error"."""
    env = _env(tmp_path)
    assert run_cm_process(["group", "create", "news"], env=env, cwd=tmp_path).returncode == 0
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails
    try:
        done = subprocess.run(
            [str(CM_BIN), *args], env={**clean, **env}, cwd=tmp_path, stdout=write, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr
