"""Configuration: where the file is found, file < CM_* environment < flags, relative paths, `cm init`,
`cm config show` and campaign.toml.example."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from campaign_manager import config
from campaign_manager.keys import toml_value
from conftest import Run, assert_error

Cm = Callable[..., Run]
ROOT = Path(__file__).parent.parent


def _show(cm: Cm, *args: str) -> dict[str, Any]:
    return dict(cm([*args, "config", "show", "--json"]).json())


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("file", "env", "flag", "expected", "source"),
    [
        (False, False, False, "{xdg_data}/campaign-manager/cm.db", "default"),
        (True, False, False, "{tmp}/from-file.db", "file"),
        (False, True, False, "{tmp}/from-env.db", "env CM_DATABASE_URL"),
        (True, True, False, "{tmp}/from-env.db", "env CM_DATABASE_URL"),
        (True, False, True, "{tmp}/from-flag.db", "flag"),
        (True, True, True, "{tmp}/from-flag.db", "flag"),
    ],
)
def test_precedence_file_then_env_then_flag(
    cm_bare: Cm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file: bool,
    env: bool,
    flag: bool,
    expected: str,
    source: str,
) -> None:
    if file:
        _write(tmp_path / "campaign.toml", '[database]\nurl = "from-file.db"\n[log]\nlevel = "info"\n')
    if env:
        monkeypatch.setenv("CM_DATABASE_URL", "from-env.db")
        monkeypatch.setenv("CM_LOG_LEVEL", "error")
    shown = _show(cm_bare, *(["--database", "from-flag.db"] if flag else []))
    url = shown["settings"]["database.url"]
    xdg = str(tmp_path / "xdg-data")
    assert url["value"] == "sqlite:///" + expected.format(tmp=tmp_path, xdg_data=xdg)
    assert url["source"].startswith(source)
    # Keys without a flag still follow file < env.
    level = shown["settings"]["log.level"]
    assert level["value"] == ("error" if env else "info" if file else "warning")
    # The database is really the one shown; one that was named is created by `cm db upgrade` only.
    flags = ["--database", "from-flag.db"] if flag else []
    if source != "default":
        assert_error(cm_bare([*flags, "recipient", "create", "ada@example.com"], ok=False), 6, "no cm database at")
        assert not Path(url["value"].removeprefix("sqlite:///")).exists()
        cm_bare([*flags, "db", "upgrade"])
    cm_bare([*flags, "recipient", "create", "ada@example.com"])
    assert Path(url["value"].removeprefix("sqlite:///")).is_file()


@pytest.mark.parametrize("where", ["--config", "CM_CONFIG", "cwd", "xdg"])
def test_where_the_config_file_is_found(
    cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Every candidate exists; each case removes the ones that come before it in the search order.
    candidates = {
        "--config": _write(tmp_path / "explicit" / "a.toml", '[log]\nlevel = "debug"\n'),
        "CM_CONFIG": _write(tmp_path / "env" / "b.toml", '[log]\nlevel = "info"\n'),
        "cwd": _write(tmp_path / "campaign.toml", '[log]\nlevel = "error"\n'),
        "xdg": _write(tmp_path / "xdg-config" / "campaign-manager" / "campaign.toml", '[log]\nlevel = "warning"\n'),
    }
    order = list(candidates)
    for earlier in order[: order.index(where)]:
        if earlier != "--config":
            candidates[earlier].unlink()
    if order.index(where) <= order.index("CM_CONFIG"):
        monkeypatch.setenv("CM_CONFIG", str(candidates["CM_CONFIG"]))
    args = ["--config", str(candidates["--config"])] if where == "--config" else []
    shown = _show(cm_bare, *args)
    assert shown["config_file"] == str(candidates[where].resolve())
    assert shown["settings"]["log.level"]["source"] == f"file {candidates[where].resolve()}"
    assert shown["settings"]["log.level"]["value"] == tomllib.loads(candidates[where].read_text())["log"]["level"]


def test_no_config_file_at_all(cm_bare: Cm) -> None:
    shown = _show(cm_bare)
    assert shown["config_file"] is None
    assert {s["source"] for s in shown["settings"].values()} <= {"default", "default (beside the database)"}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("data/cm.db", "{conf}/data/cm.db"),
        ("sqlite:///data/cm.db", "{conf}/data/cm.db"),
        ("../up.db", "{tmp}/up.db"),
        ("sqlite:///{tmp}/absolute.db", "{tmp}/absolute.db"),
    ],
)
def test_relative_sqlite_path_in_a_file_is_relative_to_the_file(
    cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    conf = tmp_path / "conf"
    path = _write(conf / "campaign.toml", f'[database]\nurl = "{url.format(tmp=tmp_path)}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    db_file = Path(expected.format(conf=conf, tmp=tmp_path))
    db_file.parent.mkdir(exist_ok=True)
    cm_bare(["--config", str(path), "db", "upgrade"])
    cm_bare(["--config", str(path), "recipient", "create", "ada@example.com"])
    assert db_file.is_file()
    assert _show(cm_bare, "--config", str(path))["settings"]["database.url"]["value"] == f"sqlite:///{db_file}"
    assert not list(elsewhere.iterdir())


def test_relative_paths_from_env_and_flags_are_relative_to_the_working_directory(
    cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_DATABASE_URL", "env.db")
    assert _show(cm_bare)["settings"]["database.url"]["value"] == f"sqlite:///{tmp_path / 'env.db'}"
    shown = _show(cm_bare, "--database", "sub/flag.db")
    assert shown["settings"]["database.url"]["value"] == f"sqlite:///{tmp_path / 'sub' / 'flag.db'}"


def test_the_default_database_lives_under_xdg_data_home(cm_bare: Cm, tmp_path: Path) -> None:
    cm_bare("group create news")
    assert (tmp_path / "xdg-data" / "campaign-manager" / "cm.db").is_file()
    assert [g["name"] for g in cm_bare("group list --json").json()] == ["news"]


def test_init_writes_a_starter_file_and_will_not_overwrite_it(cm_bare: Cm, tmp_path: Path) -> None:
    target = tmp_path / "campaign.toml"
    run = cm_bare("init")
    assert f"wrote {target}" in run.stderr
    assert target.read_text(encoding="utf-8") == config.render_example()
    target.write_text('[log]\nlevel = "info"\n', encoding="utf-8")
    assert_error(cm_bare("init", ok=False), 4, "already exists", "--force")
    assert target.read_text(encoding="utf-8") == '[log]\nlevel = "info"\n'
    cm_bare("init --force")
    assert target.read_text(encoding="utf-8") == config.render_example()
    # The starter is picked up (it is ./campaign.toml) and, all commented out, changes nothing.
    shown = _show(cm_bare)
    assert shown["config_file"] == str(target)
    assert {s["source"] for s in shown["settings"].values()} <= {"default", "default (beside the database)"}


def test_config_show_masks_secrets(cm_bare: Cm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_DATABASE_URL", "postgresql://cm:s3cr%40t@db.example.com:5432/cm")
    shown = cm_bare("config show --json")
    assert "s3cr" not in shown.stdout
    settings = shown.json()["settings"]
    assert settings["database.url"] == {
        "value": "postgresql://cm:********@db.example.com:5432/cm",
        "source": "env CM_DATABASE_URL",
    }
    assert settings["queue.url"]["value"] == "postgresql://cm:********@db.example.com:5432/cm"
    table = cm_bare("config show")
    assert "s3cr" not in table.stdout and "********" in table.stdout
    assert "config file: none" in table.stderr


# A valid value, other than the default, for every key.
KEY_VALUES: dict[str, Any] = {
    "database.url": "postgresql://u:p@h/d",
    "queue.url": "redis://localhost:6379/1",
    "queue.name": "cm-test",
    "worker.workers": 4,
    "worker.retries": 0,
    "worker.retry_delay": 1.5,
    "worker.retry_backoff": 3.0,
    "worker.lease_seconds": 30.0,
    "import.segment_rows": 50_000,
    "jobs.keep_files_days": 2.5,
    "log.level": "debug",
    "log.format": "json",
    "send.notifier": "outbox",
    "send.from": "News <news@example.org>",
    "send.max_attempts": 3,
    "send.retry_delay": 5.0,
    "send.max_delay": 600.0,
    "send.max_outage": 60.0,
    "send.record_batch": 10,
    "send.record_interval": 0.5,
    "send.claim_batch": 50,
    "send.max_message_bytes": 1_000_000,
    "unsubscribe.mailto": "unsubscribe@example.org",
    "unsubscribe.url": "https://example.org/u/{token}",
    "unsubscribe.secret": "s3cret",
    "unsubscribe.old_secrets": ("old-1", "old-2"),
    "serve.host": "0.0.0.0",
    "serve.port": 8080,
    "serve.threads": 3,
    "serve.base_url": "https://lists.example.org",
    "serve.templates": "pages",
    "serve.double_opt_in": False,
    "serve.confirm_days": 3,
    "serve.subscribe_rate": 2,
    "serve.trusted_proxies": ("127.0.0.1", "10.0.0.0/8"),
    "serve.api_token": "api-s3cret",
}


def test_every_key_has_a_test_value() -> None:
    assert set(KEY_VALUES) == set(config.KEYS)


@pytest.mark.parametrize(("key", "value"), KEY_VALUES.items())
def test_every_key_from_file_and_env(
    cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: Any
) -> None:
    env_name = str(config.KEYS[key].env)
    table, name = key.split(".")
    _write(tmp_path / "campaign.toml", f"[{table}]\n{name} = {toml_value(value)}\n")
    (tmp_path / "pages").mkdir(exist_ok=True)
    shown = config.mask(key, value)
    expected = [*shown] if isinstance(shown, tuple) else str(tmp_path / shown) if key == "serve.templates" else shown
    from_file = _show(cm_bare)["settings"][key]
    assert from_file["value"] == expected
    assert from_file["source"].startswith("file ")
    monkeypatch.setenv(env_name, ",".join(value) if isinstance(value, tuple) else str(value))
    from_env = _show(cm_bare)["settings"][key]
    assert from_env == {"value": expected, "source": f"env {env_name}"}


@pytest.mark.parametrize(
    ("file_text", "env", "message"),
    [
        ("[database\nurl = 1\n", {}, "not valid TOML"),
        ("[databse]\nurl = 'x.db'\n", {}, "unknown key 'databse.url'"),
        ("[database]\nurl = 3\n", {}, "database.url"),
        ("[worker]\nretries = 'many'\n", {}, "worker.retries"),
        ("[worker]\nretries = true\n", {}, "worker.retries"),
        ("[log]\nformat = 'xml'\n", {}, "log.format"),
        ("[log]\nlevel = 'loud'\n", {}, "log.level"),
        ("", {"CM_WORKER_WORKERS": "two"}, "CM_WORKER_WORKERS"),
        ("", {"CM_LOG_FORMAT": "yaml"}, "log.format"),
        ("", {"CM_CONFIG": "missing.toml"}, "config file not found"),
    ],
)
def test_bad_configuration(
    cm_bare: Cm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_text: str, env: dict[str, str], message: str
) -> None:
    if file_text:
        _write(tmp_path / "campaign.toml", file_text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for command in ("config show", "recipient list", "group create news"):
        assert_error(cm_bare(command, ok=False), 7, message)
    assert not (tmp_path / "xdg-data").exists()  # nothing was created


def test_missing_config_flag_file(cm_bare: Cm, tmp_path: Path) -> None:
    assert_error(cm_bare("--config nope.toml recipient list", ok=False), 7, "config file not found", "nope.toml")
    _write(tmp_path / "undecodable.toml", "").write_bytes(b"\xff\xfe[log]")
    assert_error(cm_bare("--config undecodable.toml config show", ok=False), 7, "cannot read config file")


def test_example_file_is_rendered_from_keys() -> None:
    example = (ROOT / "campaign.toml.example").read_text(encoding="utf-8")
    assert example == config.render_example(), "campaign.toml.example is out of date: run `make example`"
    for key, declared in config.KEYS.items():
        assert f"(env {declared.env})" in example and f"# {key.split('.', 1)[1]} = " in example


def test_example_file_uncommented_is_valid_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "# key = value" and "# [notifiers.NAME]" lines are uncommented: the documented values must themselves be
    # valid settings.
    text = re.sub(r"^# (\w+ = |\[notifiers\.\w+\]$)", r"\1", config.render_example(), flags=re.MULTILINE)
    assert "\n[notifiers.outbox]\n" in text and "\npath = " in text
    path = _write(tmp_path / "conf" / "campaign.toml", text)
    settings = config.load_settings(str(path))
    assert settings.warnings == []
    assert settings.database_url == f"sqlite:///{tmp_path / 'conf' / 'cm.db'}"
    assert settings.queue_url == f"sqlite:///{tmp_path / 'conf' / 'cm-queue.db'}"
    values = settings.values()
    for key, declared in config.KEYS.items():
        if declared.example is None:  # the example shows the default (else a value worked out at run time)
            assert values[key] == declared.default
            assert settings.sources[key] == f"file {path}"
    assert settings.notifiers["outbox"].path == tmp_path / "conf" / "outbox"
    assert settings.notifier_sources["notifiers.outbox.path"] == f"file {path}"


def test_readme_documents_every_key() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for key, declared in config.KEYS.items():
        assert f"| `{key}` | `{declared.env}` |" in readme, f"{key} is missing from the README's table"
