"""The command line as a whole: help and examples on every command, logging, plugins, and the installed `cm`
run as a real process."""

from __future__ import annotations

import email
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    consent = [r for r in records if r["logger"] == "campaign_manager.services.consent"]
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
    assert " INFO campaign_manager.services.consent: consent opt_out by cm recipient opt-out" in verbose.stderr
    assert not _log_records(verbose.stderr)
    assert cm("-q recipient opt-out bob@example.com").stderr == ""
    assert cm("recipient opt-out bob@example.com").stderr == "bob@example.com was already opted out\n"


class Throwaway:
    """A notifier that only remembers what it was given."""

    name = "throwaway"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.sent: list[notifiers.Message] = []

    def send(self, message: notifiers.Message) -> str:
        self.sent.append(message)
        return f"throwaway-{len(self.sent)}"


def test_plugins_lists_the_builtin_outbox() -> None:
    rows = make_cm(None)("plugins --json").json()
    assert {"name": "outbox", "module": "campaign_manager.notifiers.outbox:OutboxNotifier", "status": "loaded"} in rows
    assert "outbox" in make_cm(None)("plugins").stdout


def test_a_registered_plugin_is_listed_until_unregistered() -> None:
    notifiers.register("throwaway", Throwaway)
    try:
        rows = make_cm(None)("plugins --json").json()
        assert {"name": "throwaway", "module": "registered in process", "status": "loaded"} in rows
        cls = notifiers.load_notifiers()["throwaway"]
        instance = cls({"key": "value"})
        assert isinstance(instance, notifiers.Notifier)
        assert instance.send(notifiers.Message(to="a@example.com", subject="s", text="t")) == "throwaway-1"
    finally:
        notifiers.unregister("throwaway")
    assert "throwaway" not in notifiers.load_notifiers()
    assert "throwaway" not in [r["name"] for r in make_cm(None)("plugins --json").json()]


def test_outbox_writes_one_file_per_idempotency_key(tmp_path: Path) -> None:
    outbox = notifiers.load_notifiers()["outbox"]({"path": str(tmp_path / "out")})
    message = notifiers.Message(
        to="ada@example.com",
        subject="Hello",
        text="Plain",
        html="<p>Rich</p>",
        sender="news@example.com",
        headers={"List-Unsubscribe": "<mailto:unsub@example.com>"},
        idempotency_key="c1-r1",
    )
    outbox.send(message)
    outbox.send(message)  # a retry overwrites, never duplicates
    files = list((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["c1-r1.eml"]
    mail = email.message_from_bytes(files[0].read_bytes())
    assert (mail["To"], mail["Subject"], mail["From"]) == ("ada@example.com", "Hello", "news@example.com")
    assert mail["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    assert mail.is_multipart()


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
