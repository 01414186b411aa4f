"""Types that say what things are: the states are StrEnums that reach the database and --json as the same plain
strings as before; settings are typed sections, built and checked once; `cm config show` draws its table and its
JSON from one model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import pytest
import sqlalchemy as sa

from campaign_manager import config, db, states
from campaign_manager.audience import members
from campaign_manager.jobs import runner, tasks
from conftest import Run

Cm = Callable[..., Run]

# Every state and outcome, as the strings the database, logs and --json held before they were enums.
SPELLINGS: list[tuple[type[StrEnum], list[str]]] = [
    (states.RecipientStatus, ["active", "opted_out", "bounced", "pending"]),
    (states.JobStatus, ["queued", "running", "done", "failed", "cancelled"]),
    (states.ConsentAction, ["opt_out", "opt_in", "forget", "bounce", "clear_bounce"]),
    (states.CampaignStatus, ["draft", "scheduled", "sending", "paused", "sent", "cancelled"]),
    (states.DeliveryStatus, ["pending", "sent", "failed", "skipped"]),
    (runner.Outcome, ["done", "failed", "retry", "skipped", "released", "lost", "fault", "cancelled"]),
    (tasks.TaskOutcome, ["error"]),
    (members.MemberOutcome, ["created", "added", "already_member", "invalid", "suppressed", "duplicate"]),
    (members.RemoveOutcome, ["removed", "not_member", "unknown"]),
]


@pytest.mark.parametrize(("enum", "values"), SPELLINGS, ids=[e.__name__ for e, _ in SPELLINGS])
def test_states_keep_their_spelling(enum: type[StrEnum], values: list[str]) -> None:
    assert [member.value for member in enum] == values
    for member in enum:
        assert member == member.value and str(member) == member.value and f"{member}" == member.value
        assert json.dumps(member) == json.dumps(member.value)


def test_the_states_stored_are_plain_strings(cm: Cm, db_url: str) -> None:
    cm("group create news")
    cm("recipient create ada@example.com --group news")
    cm("recipient create bob@example.com")
    cm("recipient opt-out bob@example.com --reason stop")
    cm("campaign create --title t --subject s --text x --group news")
    added = cm("group add-recipients news --email cy@example.com --email bob@example.com --json").json()
    assert [row["outcome"] for row in added] == ["created", "suppressed"]
    engine = db.get_engine(db_url)
    with engine.connect() as connection:
        rows = {
            "recipient": connection.execute(sa.text("SELECT email, status FROM recipient ORDER BY id")).all(),
            "consent_event": connection.execute(sa.text("SELECT action FROM consent_event")).all(),
            "campaign": connection.execute(sa.text("SELECT status FROM campaign")).all(),
        }
        # What the SQL compares against is the bare string too: a query by the enum finds the rows.
        by_enum = connection.execute(
            sa.text("SELECT count(*) FROM recipient WHERE status = :s"), {"s": states.RecipientStatus.ACTIVE}
        ).scalar_one()
    assert [tuple(r) for r in rows["recipient"]] == [
        ("ada@example.com", "active"),
        ("bob@example.com", "opted_out"),
        ("cy@example.com", "active"),
    ]
    assert [tuple(r) for r in rows["consent_event"]] == [("opt_out",)]
    assert [tuple(r) for r in rows["campaign"]] == [("draft",)]
    for row in [*rows["recipient"], *rows["consent_event"], *rows["campaign"]]:
        assert type(row[-1]) is str
    assert by_enum == 2
    shown = cm("recipient show bob@example.com --json")
    assert '"status": "opted_out"' in shown.stdout


def test_settings_are_typed_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "campaign.toml"
    path.write_text("[worker]\nretry_delay = 3\n[import]\nsegment_rows = 1000\n", encoding="utf-8")
    monkeypatch.setenv("CM_WORKER_RETRIES", "5")
    monkeypatch.setenv("CM_JOBS_KEEP_FILES_DAYS", "2")
    settings = config.load_settings(str(path), {"queue.name": "q"})
    assert settings.worker == config.WorkerSettings(
        workers=1, retries=5, retry_delay=3.0, retry_backoff=2.0, lease_seconds=60.0
    )
    assert type(settings.worker.retries) is int and type(settings.worker.retry_delay) is float
    assert settings.imports.segment_rows == 1000 and type(settings.jobs.keep_files_days) is float
    assert (settings.queue.name, settings.sources["queue.name"]) == ("q", "flag")
    assert settings.sources["worker.retry_delay"] == f"file {path}"
    assert settings.sources["worker.retries"] == "env CM_WORKER_RETRIES"
    assert settings.database.url == settings.database_url and settings.queue.url == settings.queue_url
    with pytest.raises(AttributeError):  # immutable
        settings.worker.retries = 0  # type: ignore[misc]
    assert not hasattr(settings, "get")  # no untyped way in
    # Every declared key is on its section, under the name the file uses.
    assert set(settings.values()) == set(config.KEYS)


def test_config_show_draws_its_table_and_its_json_from_one_model(cm_bare: Cm, tmp_path: Path) -> None:
    (tmp_path / "campaign.toml").write_text('[worker]\nretries = 1\n[notifiers.outbox]\npath = "o"\n')
    model = cm_bare("config show --json").json()
    assert model == config.describe_settings(config.load_settings(None))
    table = cm_bare("config show")
    assert table.stderr == f"config file: {model['config_file']}\n"
    lines = table.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["key", "value", "source"]
    value_at, source_at = lines[0].index("value"), lines[0].index("source")  # columns: a value may be empty
    rows = {
        line[:value_at].strip(): {"value": line[value_at:source_at].strip(), "source": line[source_at:].strip()}
        for line in lines[1:]
    }
    as_text = {
        # a key not set (None, or an empty list) shows as an empty cell
        key: {"value": "" if shown["value"] in (None, []) else str(shown["value"]), "source": shown["source"]}
        for key, shown in model["settings"].items()
    }
    assert rows == as_text
    assert list(rows)[: len(config.KEYS)] == list(config.KEYS)  # cm's own keys, then the notifiers'
    assert rows["notifiers.outbox.path"]["value"] == str(tmp_path / "o")
