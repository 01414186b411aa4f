"""The library promise: `campaign_manager.api` is enough to do what the CLI does, without the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from campaign_manager import api


def test_every_public_name_exists() -> None:
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert missing == [] and len(api.__all__) == len(set(api.__all__)) > 40


def test_the_documented_example_runs(tmp_path: Path) -> None:
    """The module docstring's example, on a real SQLite database and queue, drained by the real worker code."""
    csv_file = tmp_path / "people.csv"
    csv_file.write_text("email,name\ncarol@example.com,Carol\nbob@example.com,Bob\nnot-an-address,X\n")
    settings = api.load_settings(None, {"database.url": f"sqlite:///{tmp_path / 'cm.db'}"})
    api.upgrade(settings.database_url)
    with api.open_session(settings.database_url) as session:
        api.create_group(session, "newsletter")
        added = api.add_recipients(session, "newsletter", ["ada@example.com"])
        api.opt_out_address(session, "bob@example.com", reason="asked by phone", source="crm")
    assert [item["outcome"] for item in added] == ["created"]

    job = api.submit_job(settings, lambda s: api.stage_import(s, str(csv_file), group="newsletter"))
    report = api.drain(settings)
    assert report.ok and report.outcomes == {job.id: "done"}
    with api.open_session(settings.database_url, write=False) as session:
        counts = api.get_job(session, job.id or 0).counts
        members = [r["email"] for r in api.iter_recipients(session, api.group_recipients(session, "newsletter"))]
        assert [r.reason for r in api.iter_rejects(session, job.id or 0)] != []
    assert counts["created"] == 1 and counts["suppressed"] == 1 and counts["invalid"] == 1
    assert sorted(members) == ["ada@example.com", "carol@example.com"]

    settings = api.load_settings(None, {"database.url": settings.database_url, "send.from": "News <news@example.com>"})
    with api.open_session(settings.database_url) as session:
        campaign = api.create_campaign(session, title="May", subject="Hi", text="News", groups=["newsletter"])
    api.submit_job(settings, lambda s: api.queue_send(s, settings, campaign.id or 0, notifier="outbox").job)
    assert api.drain(settings).ok
    with api.open_session(settings.database_url, write=False) as session:
        assert api.campaign_stats(session, campaign.id or 0)["sent"] == 2
        assert {d["email"] for d in api.iter_deliveries(session, campaign.id or 0)} == set(members)


def test_errors_carry_their_exit_code(tmp_path: Path) -> None:
    settings = api.load_settings(None, {"database.url": f"sqlite:///{tmp_path / 'cm.db'}"})
    api.upgrade(settings.database_url)
    with api.open_session(settings.database_url) as session, pytest.raises(api.NotFound) as caught:
        api.get_group(session, "nowhere")
    assert caught.value.exit_code == 3 and "nowhere" in caught.value.message
