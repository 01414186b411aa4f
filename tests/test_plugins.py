"""Plugins as outsiders ship them: `cm plugins` in a real `cm` process over a broken package installed into a folder
on PYTHONPATH (a dist-info with entry points, as pip leaves it), which must be listed and skipped, never break `cm`;
and the example plugin examples/cm-sms-gateway, which `make` installs, sending through its entry point to a real
HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from campaign_manager import config, notifiers
from campaign_manager.notifiers import Message, Need, NotifierDown, Result
from conftest import Run, make_cm, run_cm_process
from gateway_server import Answer, GatewayServer

Cm = Callable[..., Run]
ROOT = Path(__file__).parent.parent
SMS_PACKAGE = ROOT / "examples" / "cm-sms-gateway"

# One package, cm-broken 0.2.0, with a notifier for each way a plugin can fail to be one, and one that works.
ENTRY_POINTS = {
    "needs_requests": ("broken_import:Notifier", "ModuleNotFoundError: No module named 'requests_for_cm_tests'"),
    "raises": ("broken_raise:Notifier", "RuntimeError: the plugin's import failed"),
    "syntax": ("broken_syntax:Notifier", "SyntaxError: "),
    "missing": ("broken_shapes:Nothing", "AttributeError: "),
    "no_send": ("broken_shapes:NoSend", "TypeError: NoSend has neither send_batch nor stream"),
    "fax": ("broken_shapes:Fax", "TypeError: Fax.needs must be one of email, phone, not 'fax'"),
    "bad_keys": ("broken_shapes:BadKeys", "TypeError: Settings.port must be annotated Annotated[TYPE, key(...)]"),
    "function": ("broken_shapes:send", "TypeError: <function send at"),
}
MODULES = {
    "broken_import.py": "import requests_for_cm_tests\n",
    "broken_raise.py": 'raise RuntimeError("the plugin\'s import failed")\n',
    "broken_syntax.py": "def Notifier(:\n",
    "broken_shapes.py": """\
from typing import NamedTuple


class Settings(NamedTuple):
    port: int = 25


class NoSend:
    name = "no_send"


class Fax:
    needs = "fax"

    def send_batch(self, messages):
        return []


class BadKeys:
    config_class = Settings

    def send_batch(self, messages):
        return []


class Works:
    needs = "phone"

    def __init__(self, config):
        pass

    def send_batch(self, messages):
        return []


def send(messages):
    return []
""",
}


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A folder holding the package cm-broken as pip installs one: its modules and a dist-info naming its entry
    points. On PYTHONPATH, importlib.metadata finds it as it finds any installed package."""
    site = tmp_path / "site"
    info = site / "cm_broken-0.2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cm-broken\nVersion: 0.2.0\n", encoding="utf-8")
    lines = [f"{name} = {value}" for name, (value, _error) in ENTRY_POINTS.items()]
    entry_points = "\n".join(["[campaign_manager.notifiers]", *lines, "works = broken_shapes:Works", ""])
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")
    for name, text in MODULES.items():
        (site / name).write_text(text, encoding="utf-8")
    return site


def _cm(args: list[str], site: Path, cwd: Path) -> tuple[int, str, str]:
    done = run_cm_process(args, env={"PYTHONPATH": str(site)}, cwd=cwd)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def test_a_broken_plugin_is_listed_with_its_error_and_skipped(broken_site: Path, tmp_path: Path) -> None:
    code, out, err = _cm(["plugins", "--json"], broken_site, tmp_path)
    assert (code, err) == (0, "")
    rows = {row["name"]: row for row in json.loads(out)}
    for name, (value, error) in ENTRY_POINTS.items():
        row = rows[name]
        assert (row["status"], row["module"], row["needs"]) == ("failed", value, None), row
        assert row["error"].startswith(error), row
        assert (row["package"], row["version"]) == ("cm-broken", "0.2.0")
    # The same package's good notifier, and everything else installed, still load.
    assert rows["works"] | {"error": None} == {
        "name": "works",
        "module": "broken_shapes:Works",
        "package": "cm-broken",
        "version": "0.2.0",
        "needs": "phone",
        "status": "loaded",
        "error": None,
    }
    assert {rows[name]["status"] for name in ("outbox", "webhook", "sms")} == {"loaded"}
    # Loaded first, then failed, each group by name.
    names = [row["name"] for row in json.loads(out)]
    loaded = [n for n in names if rows[n]["status"] == "loaded"]
    assert names == sorted(loaded) + sorted(ENTRY_POINTS)


def test_the_plugins_table_shows_package_version_needs_status_and_error(broken_site: Path, tmp_path: Path) -> None:
    code, out, _err = _cm(["plugins"], broken_site, tmp_path)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["name", "package", "version", "needs", "status", "error"]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert by_name["outbox"].split() == ["outbox", "campaign-manager", notifiers_version(), "email", "loaded"]
    assert by_name["works"].split() == ["works", "cm-broken", "0.2.0", "phone", "loaded"]
    assert by_name["raises"].split()[:4] == ["raises", "cm-broken", "0.2.0", "failed"]
    assert by_name["raises"].endswith("RuntimeError: the plugin's import failed")


def notifiers_version() -> str:
    return version("campaign-manager")


def test_a_broken_plugin_never_breaks_other_commands(broken_site: Path, tmp_path: Path) -> None:
    # A [notifiers.*] table makes every command load the plugins, to check the tables.
    (tmp_path / "campaign.toml").write_text('[notifiers.outbox]\npath = "o"\n\n[notifiers.raises]\nurl = "x"\n')
    code, out, err = _cm(["group", "list", "--json"], broken_site, tmp_path)
    assert (code, out) == (0, "[]\n")
    [warning] = err.strip().splitlines()
    assert "[notifiers.raises] is ignored: the notifier 'raises' failed to load (RuntimeError" in warning
    code, out, _err = _cm(["config", "show", "--json"], broken_site, tmp_path)
    assert code == 0 and json.loads(out)["settings"]["notifiers.outbox.path"]["value"] == str(tmp_path / "o")


# --- the example plugin, cm-sms-gateway


def _sms_message(n: int, phone: str = "+447700900123") -> Message:
    return Message(
        key=f"db1-{n}", to=phone, sender="News <news@example.com>", envelope_from="", subject="s", text=f"Sale {n}"
    )


def test_the_sms_plugin_is_installed_as_its_own_package() -> None:
    with (SMS_PACKAGE / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    cls = notifiers.load_notifiers().get("sms")
    assert cls is not None, "cm-sms-gateway is not installed: run `make .venv/.installed`"
    assert (cls.__module__, cls.__name__, notifiers.needs(cls)) == ("cm_sms_gateway", "SmsNotifier", Need.PHONE)
    assert project["entry-points"][notifiers.ENTRY_POINT_GROUP] == {"sms": "cm_sms_gateway:SmsNotifier"}
    assert version("cm-sms-gateway") == project["version"]
    assert "sms" not in notifiers.builtin_notifiers()


def test_cm_plugins_lists_the_sms_plugin_with_its_package(tmp_path: Path) -> None:
    done = run_cm_process(["plugins", "--json"], env={}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [row] = [row for row in json.loads(done.stdout) if row["name"] == "sms"]
    assert row == {
        "name": "sms",
        "module": "cm_sms_gateway:SmsNotifier",
        "package": "cm-sms-gateway",
        "version": version("cm-sms-gateway"),
        "needs": "phone",
        "status": "loaded",
        "error": None,
    }


def test_the_sms_plugin_sends_through_its_entry_point_with_settings_from_cm(
    gateway_server: GatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_NOTIFIERS_SMS_URL", gateway_server.url)
    monkeypatch.setenv("CM_NOTIFIERS_SMS_API_KEY", "k3y")
    monkeypatch.setenv("CM_NOTIFIERS_SMS_SENDER_ID", "News")
    cls = notifiers.load_notifiers()["sms"]
    sms: Any = cls(config.load_settings(None).notifiers["sms"])
    sms.open()
    try:
        gateway_server.answer(Answer(200, b'{"id": "sm-1", "parts": 1}', (("Content-Type", "application/json"),)))
        results = sms.send_batch([_sms_message(1), _sms_message(2, "+15550100")])
    finally:
        sms.close()
    assert results == [Result.sent("sm-1"), Result.sent("gw-2")]
    assert [r.json() for r in gateway_server.requests] == [
        {"to": "+447700900123", "text": "Sale 1", "reference": "db1-1", "from": "News"},
        {"to": "+15550100", "text": "Sale 2", "reference": "db1-2", "from": "News"},
    ]
    for request in gateway_server.requests:
        assert request.headers["Authorization"] == "Bearer k3y"
        assert request.headers["Idempotency-Key"] == json.loads(request.body)["reference"]
    assert len({r.port for r in gateway_server.requests}) == 1


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (Answer(503, headers=(("Retry-After", "5"),)), Result.retry("HTTP 503 Service Unavailable", after=5)),
        (Answer(429), Result.retry("HTTP 429 Too Many Requests")),
        (
            Answer(400, b"number not mobile", (("Content-Type", "text/plain"),)),
            Result.failed("HTTP 400 Bad Request: number not mobile"),
        ),
    ],
)
def test_the_sms_plugin_follows_the_gateway_rules(
    gateway_server: GatewayServer, answer: Answer, result: Result
) -> None:
    cls: Any = notifiers.load_notifiers()["sms"]
    sms = cls(notifiers.config_class(cls)(url=gateway_server.url))
    gateway_server.answer(answer)
    assert sms.send_batch([_sms_message(1)]) == [result]
    assert "from" not in gateway_server.requests[0].json()  # no sender id set
    assert "Authorization" not in gateway_server.requests[0].headers  # nor a key


def test_the_sms_plugin_raises_notifier_down_when_the_gateway_is_down_or_refuses_the_key(
    gateway_server: GatewayServer,
) -> None:
    cls: Any = notifiers.load_notifiers()["sms"]
    sms = cls(notifiers.config_class(cls)(url=gateway_server.url, api_key="wrong"))
    gateway_server.answer(Answer(401))
    with pytest.raises(NotifierDown, match="HTTP 401 Unauthorized"):
        sms.send_batch([_sms_message(1)])
    gateway_server.stop()
    with pytest.raises(NotifierDown, match="Connection refused"):
        sms.open()


def test_the_sms_plugin_in_a_real_cm_process_masks_its_key(tmp_path: Path) -> None:
    path = tmp_path / "campaign.toml"
    path.write_text('[notifiers.sms]\nurl = "https://sms.example/v1"\nsender_id = "News"\n', encoding="utf-8")
    done = run_cm_process(["config", "show", "--json"], env={"CM_NOTIFIERS_SMS_API_KEY": "k3y"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["settings"]
    assert shown["notifiers.sms.api_key"] == {"value": config.MASKED, "source": "env CM_NOTIFIERS_SMS_API_KEY"}
    assert shown["notifiers.sms.sender_id"] == {"value": "News", "source": f"file {path}"}
    assert "k3y" not in done.stdout
    path.write_text('[notifiers.sms]\nsender = "News"\n', encoding="utf-8")  # not its key: sender_id
    done = run_cm_process(["group", "list"], env={}, cwd=tmp_path)
    assert done.returncode == 7 and "unknown key 'notifiers.sms.sender'" in done.stderr
    assert os.environ.get("CM_NOTIFIERS_SMS_API_KEY") is None  # the process's environment only


def test_the_cli_lists_the_sms_plugin_in_process() -> None:
    rows = {row["name"]: row for row in make_cm(None)("plugins --json").json()}
    assert (rows["sms"]["package"], rows["sms"]["needs"]) == ("cm-sms-gateway", "phone")
