"""`[notifiers.NAME]` tables: each notifier declares its keys (campaign_manager.keys.key); an unknown key or a value
of the wrong type exits 7, the table of a notifier that is not installed gets a warning, declared secrets are
masked by `cm config show`, and campaign.toml.example's notifier part is generated from the built-ins'
declarations. A throwaway notifier (`probe`) is registered for the tests that need more key types than `outbox`
has; the real `cm` processes use `outbox`, which they find through its entry point."""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tomllib
import types
from collections.abc import Callable, Iterator
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import pytest

from campaign_manager import config, keys, notifiers
from campaign_manager.notifiers import Message, Result, key
from campaign_manager.notifiers.outbox import OutboxNotifier, OutboxSettings
from conftest import Run, assert_error, make_cm, run_cm_process

Cm = Callable[..., Run]
ROOT = Path(__file__).parent.parent


@dataclass(frozen=True)  # a plugin's choice; cm's own sections and outbox are NamedTuples: both are read alike
class ProbeSettings:
    endpoint: Annotated[str | None, key("where messages go", env="CM_NOTIFIERS_PROBE_ENDPOINT")] = None
    api_key: Annotated[str | None, key("the provider's key", env="CM_NOTIFIERS_PROBE_API_KEY", secret=True)] = None
    retries: Annotated[int, key("attempts", env="CM_NOTIFIERS_PROBE_RETRIES")] = 2
    timeout: Annotated[float, key("seconds")] = 5.0
    verify: Annotated[bool, key("check the certificate", env="CM_NOTIFIERS_PROBE_VERIFY")] = True
    spool: Annotated[Path, key("a folder")] = Path("spool")


class ProbeNotifier:
    name = "probe"
    config_class = ProbeSettings

    def __init__(self, config: ProbeSettings) -> None:
        self.config = config

    def send_batch(self, messages: list[Message]) -> list[Result]:
        return [Result.sent("probe-1") for _ in messages]


@pytest.fixture
def probe() -> Iterator[None]:
    notifiers.register("probe", ProbeNotifier)
    try:
        yield
    finally:
        notifiers.unregister("probe")


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def _show(cm: Cm) -> dict[str, Any]:
    return dict(cm("config show --json").json()["settings"])


# --- what the tables give


def test_a_notifiers_table_reaches_the_notifier_typed(
    probe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path / "conf" / "campaign.toml",
        '[notifiers.probe]\nendpoint = "https://file.example"\nretries = 5\ntimeout = 1\nverify = false\n'
        'spool = "out"\n\n[notifiers.outbox]\npath = "mail"\n',
    )
    monkeypatch.setenv("CM_NOTIFIERS_PROBE_ENDPOINT", "https://env.example")
    settings = config.load_settings(str(path))
    assert settings.warnings == []
    conf = tmp_path / "conf"
    assert settings.notifiers["probe"] == ProbeSettings(
        endpoint="https://env.example", api_key=None, retries=5, timeout=1.0, verify=False, spool=conf / "out"
    )
    assert type(settings.notifiers["probe"].timeout) is float  # a TOML integer is a fine float, made one
    assert settings.notifiers["outbox"] == OutboxSettings(path=conf / "mail")  # relative to the file
    sources = settings.notifier_sources
    assert sources["notifiers.probe.endpoint"] == "env CM_NOTIFIERS_PROBE_ENDPOINT"
    assert sources["notifiers.probe.retries"] == f"file {path}"
    assert sources["notifiers.probe.api_key"] == "default"
    with pytest.raises(FrozenInstanceError):
        settings.notifiers["probe"].retries = 1  # type: ignore[misc]
    # The outbox notifier built from its settings writes where they say.
    outbox = OutboxNotifier(settings.notifiers["outbox"])
    outbox.open()
    data = b"To: a@example.com\r\n\r\nt\r\n"
    outbox.send_batch(
        [Message(key="k", to="a@example.com", sender="", envelope_from="", subject="s", text="t", data=data)]
    )
    [written] = (conf / "mail").iterdir()
    assert email.message_from_bytes(written.read_bytes())["To"] == "a@example.com"


def test_environment_values_are_parsed_and_relative_paths_follow_the_working_folder(
    probe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_NOTIFIERS_PROBE_RETRIES", "7")
    monkeypatch.setenv("CM_NOTIFIERS_PROBE_VERIFY", "No")
    monkeypatch.setenv("CM_NOTIFIERS_OUTBOX_PATH", "from-env")
    settings = config.load_settings(None)
    assert (settings.notifiers["probe"].retries, settings.notifiers["probe"].verify) == (7, False)
    assert settings.notifiers["outbox"].path == tmp_path / "from-env"
    assert settings.notifier_sources["notifiers.outbox.path"] == "env CM_NOTIFIERS_OUTBOX_PATH"
    assert config.load_settings(None).notifiers["outbox"] != OutboxSettings()  # the default is "outbox"
    monkeypatch.delenv("CM_NOTIFIERS_OUTBOX_PATH")
    assert config.load_settings(None).notifiers["outbox"] == OutboxSettings(path=Path("outbox"))


# --- refused, warned about


@pytest.mark.parametrize("command", ["config show", "group list", "group create news"])
def test_an_unknown_key_in_an_installed_notifiers_table_exits_7(cm_bare: Cm, tmp_path: Path, command: str) -> None:
    path = _write(tmp_path / "campaign.toml", '[notifiers.outbox]\npath = "out"\npth = "typo"\n')
    run = cm_bare(command, ok=False)
    assert_error(run, 7, "unknown key 'notifiers.outbox.pth'", str(path), "the keys of [notifiers.outbox]: path")
    assert not (tmp_path / "xdg-data").exists()  # nothing was created


@pytest.mark.parametrize(
    ("table", "env", "message"),
    [
        ("retries = 'many'", {}, "notifiers.probe.retries from file"),
        ("retries = 1.5", {}, "notifiers.probe.retries"),
        ("retries = true", {}, "notifiers.probe.retries"),
        ("timeout = 'soon'", {}, "notifiers.probe.timeout"),
        ("verify = 3", {}, "notifiers.probe.verify"),
        ("verify = 'maybe'", {}, "notifiers.probe.verify"),
        ("endpoint = 3", {}, "notifiers.probe.endpoint"),
        ("spool = 3", {}, "notifiers.probe.spool"),
        ("spool = ''", {}, "notifiers.probe.spool"),
        ("endpoint = { url = 'x' }", {}, "notifiers.probe.endpoint"),
        ("", {"CM_NOTIFIERS_PROBE_RETRIES": "two"}, "from CM_NOTIFIERS_PROBE_RETRIES must be an integer"),
        ("", {"CM_NOTIFIERS_PROBE_VERIFY": "maybe"}, "from CM_NOTIFIERS_PROBE_VERIFY must be true or false"),
    ],
)
def test_a_value_of_the_wrong_type_exits_7(
    probe: None,
    cm_bare: Cm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    table: str,
    env: dict[str, str],
    message: str,
) -> None:
    _write(tmp_path / "campaign.toml", f"[notifiers.probe]\n{table}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert_error(cm_bare("config show", ok=False), 7, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("notifiers = 1\n", "[notifiers.NAME]"),
        ("[notifiers]\noutbox = 'x'\n", "notifiers.outbox"),
    ],
)
def test_notifiers_must_be_tables(cm_bare: Cm, tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path / "campaign.toml", text)
    assert_error(cm_bare("group list", ok=False), 7, message, "must be")


def test_the_table_of_a_notifier_not_installed_is_a_warning(cm_bare: Cm, tmp_path: Path) -> None:
    path = _write(tmp_path / "campaign.toml", '[notifiers.fax]\napi_key = "k"\n\n[notifiers.outbox]\npath = "o"\n')
    run = cm_bare("group create news")
    [line] = run.stderr.strip().splitlines()
    assert "WARNING" in line and f"{path}: [notifiers.fax] is ignored: no notifier 'fax' is installed" in line
    assert cm_bare("-q group list --json").stderr == ""  # a warning, which -q silences
    shown = _show(cm_bare)
    assert not [name for name in shown if name.startswith("notifiers.fax")]
    assert shown["notifiers.outbox.path"]["value"] == str(tmp_path / "o")


def test_a_notifier_that_failed_to_load_is_named_in_the_warning(
    cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifiers.load_notifiers()
    monkeypatch.setitem(notifiers._errors, "broken", "ImportError: no module named 'requests'")
    _write(tmp_path / "campaign.toml", "[notifiers.broken]\nurl = 'x'\n")
    line = cm_bare("group list").stderr.strip()
    assert "[notifiers.broken] is ignored: the notifier 'broken' failed to load (ImportError" in line


@pytest.mark.parametrize(
    ("text", "code", "stderr"),
    [
        ('[notifiers.outbox]\npth = "x"\n', 7, "error: unknown key 'notifiers.outbox.pth' in {path}"),
        ("[notifiers.outbox]\npath = 3\n", 7, "error: notifiers.outbox.path from file {path} must be a path"),
        ('[notifiers.fax]\nkey = "x"\n', 0, "{path}: [notifiers.fax] is ignored: no notifier 'fax' is installed"),
        ('[notifiers.outbox]\npath = "out"\n', 0, ""),
    ],
)
def test_notifier_tables_in_a_real_cm_process(tmp_path: Path, text: str, code: int, stderr: str) -> None:
    path = _write(tmp_path / "campaign.toml", text)
    proc = run_cm_process(["group", "list", "--json"], env={}, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == (1 if stderr else 0), proc.stderr
    if stderr:
        assert stderr.format(path=path) in lines[0]
    assert (proc.stdout == "[]\n") == (code == 0)


# --- secrets


def test_declared_secrets_are_masked_by_config_show(
    probe: None, cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "campaign.toml", '[notifiers.probe]\napi_key = "s3cr3t-file"\nendpoint = "https://e"\n')
    table = cm_bare("config show")
    assert "s3cr3t" not in table.stdout and "s3cr3t" not in table.stderr
    assert re.search(r"^notifiers\.probe\.api_key +\*{8} +file ", table.stdout, flags=re.MULTILINE), table.stdout
    shown = cm_bare("config show --json")
    assert "s3cr3t" not in shown.stdout
    assert shown.json()["settings"]["notifiers.probe.api_key"]["value"] == config.MASKED
    assert shown.json()["settings"]["notifiers.probe.endpoint"]["value"] == "https://e"  # not a secret
    monkeypatch.setenv("CM_NOTIFIERS_PROBE_API_KEY", "s3cr3t-env")
    shown = cm_bare("config show --json")
    assert "s3cr3t" not in shown.stdout
    assert shown.json()["settings"]["notifiers.probe.api_key"] == {
        "value": config.MASKED,
        "source": "env CM_NOTIFIERS_PROBE_API_KEY",
    }
    # The notifier itself gets the value.
    assert config.load_settings(None).notifiers["probe"].api_key == "s3cr3t-env"


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, False), (0o600, False)])
def test_a_world_readable_file_holding_a_declared_secret_gets_a_warning(
    probe: None, cm_bare: Cm, tmp_path: Path, mode: int, warned: bool
) -> None:
    path = _write(tmp_path / "campaign.toml", '[notifiers.probe]\napi_key = "s3cr3t"\n', mode)
    stderr = cm_bare("group list").stderr
    assert (f"{path} holds a password and every user of this machine can read it" in stderr) is warned
    assert "s3cr3t" not in stderr
    # A file with no secret in it is not warned about, whatever its mode.
    _write(path, '[notifiers.probe]\nendpoint = "https://e"\n', mode)
    assert cm_bare("group list").stderr == ""


def test_the_readme_plugin_example_declares_its_keys_as_documented(
    cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README shows the example plugin's module (examples/cm-sms-gateway), which `make` installs: the block
    # runs on its own, is the installed plugin's code, and that plugin's keys behave as the README says.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Notifier plugins\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("readme_sms")  # a module of its own, as a plugin is
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec", dont_inherit=True), module.__dict__)
    sms = module.SmsNotifier
    assert isinstance(sms(sms.config_class(url="https://sms.example")), notifiers.Notifier)
    assert notifiers.needs(sms) == notifiers.Need.PHONE
    assert [k.name for k in keys.declared(sms.config_class)] == ["url", "api_key", "sender_id", "timeout"]
    source = ROOT / "examples" / "cm-sms-gateway" / "src" / "cm_sms_gateway" / "__init__.py"
    assert code in source.read_text(encoding="utf-8"), "the README's plugin example must be cm_sms_gateway's code"
    assert notifiers.load_notifiers()["sms"].__module__ == "cm_sms_gateway"  # installed: its keys are read below
    _write(tmp_path / "campaign.toml", '[notifiers.sms]\nurl = "https://sms.example"\napi_key = "k3y"\n')
    shown = _show(cm_bare)
    assert shown["notifiers.sms.url"]["value"] == "https://sms.example"
    assert shown["notifiers.sms.api_key"]["value"] == config.MASKED
    assert shown["notifiers.sms.timeout"] == {"value": 10.0, "source": "default"}
    _write(tmp_path / "campaign.toml", "[notifiers.sms]\ntimeout = 'soon'\n")
    assert_error(cm_bare("group list", ok=False), 7, "notifiers.sms.timeout")


# --- the example file, generated


def test_the_example_documents_the_builtin_notifiers_only(probe: None) -> None:
    example = config.render_example()
    builtins = notifiers.builtin_notifiers()
    with (ROOT / "pyproject.toml").open("rb") as file:
        declared_here = tomllib.load(file)["project"]["entry-points"][notifiers.ENTRY_POINT_GROUP]
    assert set(builtins) == set(declared_here) >= {"email", "outbox", "webhook"}  # found through cm's own entry points
    assert "sms" not in builtins  # installed (examples/cm-sms-gateway), but not cm's: not in cm's example file
    for name, cls in builtins.items():
        assert f"\n# [notifiers.{name}]\n" in example
        for k in keys.declared(notifiers.config_class(cls)):
            assert f"# {k.help}" in example and f"# {k.name} = {k.example_value()}\n" in example
            assert k.env is None or f"(env {k.env})" in example
    assert "probe" not in example  # registered in process: not a built-in
    assert example == (ROOT / "campaign.toml.example").read_text(encoding="utf-8")


def test_python_m_config_regenerates_the_example(tmp_path: Path) -> None:
    target = tmp_path / "campaign.toml.example"
    target.write_text("stale\n", encoding="utf-8")
    command = [sys.executable, "-m", "campaign_manager.config", str(target)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert "rewritten" in first.stdout
    assert target.read_text(encoding="utf-8") == config.render_example()
    second = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert "already up to date" in second.stdout


def test_the_readme_documents_the_builtin_notifiers_keys() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, cls in notifiers.builtin_notifiers().items():
        for k in keys.declared(notifiers.config_class(cls)):
            assert f"| `notifiers.{name}.{k.name}` | `{k.env}` |" in readme


# --- declarations


def test_a_command_with_no_notifiers_table_does_not_load_the_plugins(tmp_path: Path) -> None:
    # Loading them costs start-up time (entry points, the plugins' imports): only a file that configures
    # notifiers, or `cm config show`, pays for it.
    script = (
        "import sys\n"
        "from campaign_manager import config, notifiers\n"
        "settings = config.load_settings(sys.argv[1] if len(sys.argv) > 1 else None)\n"
        "print(notifiers._loaded is None)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    plain = _write(tmp_path / "plain.toml", '[log]\nlevel = "info"\n')
    with_table = _write(tmp_path / "with.toml", '[notifiers.outbox]\npath = "o"\n')
    for path, unloaded in ((None, "True"), (plain, "True"), (with_table, "False")):
        args = [sys.executable, "-c", script, *([str(path)] if path else [])]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=True)
        assert proc.stdout.strip() == unloaded, (path, proc.stderr)


def test_what_a_declaration_may_be() -> None:
    @dataclass
    class NotFrozen:
        a: Annotated[int, key("x")] = 1

    class Plain:
        a: Annotated[int, key("x")] = 1

    class Listed(NamedTuple):
        a: Annotated[list[str], key("x")] = []  # noqa: RUF012

    class Undeclared(NamedTuple):
        a: int = 1

    class NoDefault(NamedTuple):
        a: Annotated[int, key("x")]

    for cls, message in (
        (NotFrozen, "must be a NamedTuple or a frozen dataclass"),
        (Plain, "must be a NamedTuple or a frozen dataclass"),
        (Listed, "type must be one of str, int, float, bool, Path"),
        (Undeclared, "must be annotated Annotated[TYPE, key(...)]"),
        (NoDefault, "needs a default"),
    ):
        with pytest.raises(TypeError, match=re.escape(message)):
            keys.declared(cls)
    assert [(k.name, k.kind, k.optional, k.secret) for k in keys.declared(ProbeSettings)] == [
        ("endpoint", str, True, False),
        ("api_key", str, True, True),
        ("retries", int, False, False),
        ("timeout", float, False, False),
        ("verify", bool, False, False),
        ("spool", Path, False, False),
    ]


def test_a_notifier_without_a_declaration_takes_no_keys(cm_bare: Cm, tmp_path: Path) -> None:
    class Bare:
        name = "bare"

        def __init__(self, config: Any) -> None: ...

        def send_batch(self, messages: list[Message]) -> list[Result]:
            return []

    notifiers.register("bare", Bare)  # type: ignore[arg-type]  # no config_class: what an older plugin may be
    try:
        assert config.load_settings(None).notifiers["bare"] == notifiers.NoKeys()
        _write(tmp_path / "campaign.toml", "[notifiers.bare]\nanything = 1\n")
        assert_error(cm_bare("group list", ok=False), 7, "unknown key 'notifiers.bare.anything'", "none")
    finally:
        notifiers.unregister("bare")
    assert make_cm(None)("group list").exit_code == 0  # the table of a notifier gone is a warning again
