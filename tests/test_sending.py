"""Sending a campaign through the real CLI, queue and worker, on SQLite and PostgreSQL: the ledger, exactly-once,
retries and bounces, a notifier that is down, pause/resume/cancel, scheduling. A notifier registered in process
(`Recorder`) stands in where a test needs to choose each result; the outbox and the email notifier (against a
real SMTP server: tests/test_send_smtp.py) are the real thing."""

from __future__ import annotations

import email
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from campaign_manager import notifiers
from campaign_manager.notifiers import Message, NotifierDown, Result
from conftest import Run, assert_error

Cm = Callable[..., Run]


class Recorder:
    """A notifier whose results the test chooses (by address), and that remembers every message it was given."""

    name = "recorder"
    received: ClassVar[list[Message]] = []
    rules: ClassVar[dict[str, list[Result]]] = {}  # address -> results to give, in turn (then: sent)
    down: ClassVar[int] = 0  # the next this many calls raise NotifierDown
    on_batch: ClassVar[Callable[[Sequence[Message]], None] | None] = None
    lock = threading.Lock()

    def __init__(self, config: Any) -> None:
        self.config = config

    def send_batch(self, messages: Sequence[Message]) -> list[Result]:
        with Recorder.lock:
            if Recorder.down:
                Recorder.down -= 1
                raise NotifierDown("421 service not available")
            if Recorder.on_batch is not None:
                Recorder.on_batch(messages)
            results = []
            for message in messages:
                Recorder.received.append(message)
                queue = Recorder.rules.get(message.to)
                results.append(queue.pop(0) if queue else Result.sent(f"id-{message.key}"))
            return results


@pytest.fixture
def recorder() -> Iterator[type[Recorder]]:
    Recorder.received, Recorder.rules, Recorder.down, Recorder.on_batch = [], {}, 0, None
    notifiers.register("recorder", Recorder)  # type: ignore[arg-type]
    try:
        yield Recorder
    finally:
        notifiers.unregister("recorder")


def _config(tmp_path: Path, extra: str = "") -> None:
    (tmp_path / "campaign.toml").write_text(
        '[send]\nfrom = "News <news@example.com>"\nretry_delay = 0.2\nrecord_interval = 0.05\n'
        f'{extra}\n[notifiers.outbox]\npath = "out"\n',
        encoding="utf-8",
    )


def _campaign(cm: Cm, emails: Sequence[str], *, subject: str = "Hello {{ name }}", text: str | None = None) -> int:
    cm("group create news")
    cm(["group", "add-recipients", "news", *[arg for e in emails for arg in ("--email", e)]])
    body = text or "Dear {{ name or email }},\nnews.\n{{ unsubscribe_url }}\n"
    made = cm(["campaign", "create", "--title", "t", "--subject", subject, "--text", body, "--group", "news", "--json"])
    return int(made.json()["id"])


def _stats(cm: Cm, cid: int) -> dict[str, Any]:
    return dict(cm(f"campaign stats {cid} --json").json())


def test_no_notifier_is_no_default(cm: Cm, tmp_path: Path) -> None:
    (tmp_path / "campaign.toml").write_text('[send]\nfrom = "n@example.com"\n', encoding="utf-8")
    cid = _campaign(cm, ["a@example.com"])
    assert_error(cm(f"campaign send {cid} --wait", ok=False), 7, "no notifier to send with", "outbox")
    assert _stats(cm, cid)["status"] == "draft"
    assert not (tmp_path / "out").exists()
    assert_error(cm(f"campaign send {cid} --notifier nosuch", ok=False), 7, "no notifier 'nosuch'")


def test_outbox_send_writes_the_ledger_and_sends_once(cm: Cm, tmp_path: Path) -> None:
    _config(tmp_path)
    cid = _campaign(cm, ["ada@example.com", "grace@example.com", "alan@example.com"])
    cm("recipient opt-out alan@example.com")
    cm(f"campaign send {cid} --notifier outbox --wait")
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 2
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    to = {email.message_from_bytes(f.read_bytes())["To"] for f in files}
    assert to == {"ada@example.com", "grace@example.com"}
    stats = _stats(cm, cid)
    assert (stats["status"], stats["sent"], stats["skipped"], stats["pending"], stats["failed"]) == ("sent", 2, 1, 0, 0)
    assert stats["notifier"] == "outbox"
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    assert rows["alan@example.com"]["status"] == "skipped" and rows["alan@example.com"]["error"] == "opted out"
    assert rows["ada@example.com"]["attempts"] == 1 and rows["ada@example.com"]["sent_at"]
    # Sending again sends nothing new; --new mails only someone added since.
    again = cm(f"campaign send {cid} --notifier outbox --wait")
    assert "nothing new to send" in again.stderr
    assert len(list((tmp_path / "out").iterdir())) == 2
    cm("group add-recipients news --email new@example.com")
    cm(f"campaign send {cid} --new --wait")
    assert _stats(cm, cid)["sent"] == 3
    assert len(list((tmp_path / "out").iterdir())) == 3
    failed = cm(f"campaign deliveries {cid} --status failed --json").json()
    assert failed == []


def test_queued_send_through_the_worker_and_pause_resume(cm: Cm, tmp_path: Path, recorder: type[Recorder]) -> None:
    _config(tmp_path, 'notifier = "recorder"')
    cid = _campaign(cm, [f"p{i}@example.com" for i in range(5)])
    job = cm(f"campaign send {cid}").stdout.strip()
    assert job.isdigit()
    cm(f"campaign pause {cid}")
    cm("worker --drain")
    assert recorder.received == [] and _stats(cm, cid)["status"] == "paused"
    cm(f"campaign resume {cid}")
    cm("worker --drain")
    stats = _stats(cm, cid)
    assert (stats["status"], stats["sent"]) == ("sent", 5)
    assert sorted(m.to for m in recorder.received) == [f"p{i}@example.com" for i in range(5)]
    keys = {m.key for m in recorder.received}
    assert len(keys) == 5 and all(k.count("-") == 1 for k in keys)  # <database id>-<delivery id>


def test_retries_then_fails_and_hard_bounces_are_kept_out(cm: Cm, tmp_path: Path, recorder: type[Recorder]) -> None:
    _config(tmp_path, 'notifier = "recorder"\nmax_attempts = 3')
    cid = _campaign(cm, ["ok@example.com", "slow@example.com", "never@example.com", "gone@example.com"])
    recorder.rules = {
        "slow@example.com": [Result.retry("451 4.7.1 try later for slow@example.com")],
        "never@example.com": [Result.retry("452 4.2.2 mailbox full")] * 3,
        "gone@example.com": [Result.failed("550 5.1.1 gone@example.com: no such user", bounce=True)],
    }
    cm(f"campaign send {cid} --wait")
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    assert (rows["ok@example.com"]["status"], rows["ok@example.com"]["attempts"]) == ("sent", 1)
    assert (rows["slow@example.com"]["status"], rows["slow@example.com"]["attempts"]) == ("sent", 2)
    assert (rows["never@example.com"]["status"], rows["never@example.com"]["attempts"]) == ("failed", 3)
    assert rows["never@example.com"]["error"] == "452 4.2.2 mailbox full (after 3 attempts)"
    assert rows["gone@example.com"]["status"] == "failed"
    assert "<recipient>" in rows["gone@example.com"]["error"] and "gone@" not in rows["gone@example.com"]["error"]
    assert cm("recipient show gone@example.com --json").json()["status"] == "bounced"
    stats = _stats(cm, cid)
    assert (stats["status"], stats["hard_bounces"], stats["failed"]) == ("sent", 1, 2)
    # retry: only the failed ones, not the hard bounce.
    before = len(recorder.received)
    assert "re-queued 1 failed" in cm(f"campaign retry {cid}").stderr
    cm("worker --drain")
    again = [m.to for m in recorder.received[before:]]
    assert again == ["never@example.com"]
    assert cm(f"campaign deliveries {cid} --status failed --json").json()[0]["email"] == "gone@example.com"
    # --include-bounced clears the bounce (the operator's call) and tries the address again.
    cm(f"campaign retry {cid} --include-bounced")
    cm("worker --drain")
    assert recorder.received[-1].to == "gone@example.com"
    assert cm("recipient show gone@example.com --json").json()["status"] == "active"
    assert _stats(cm, cid)["failed"] == 0


def test_a_notifier_down_counts_no_attempt_and_the_send_completes(
    cm: Cm, tmp_path: Path, recorder: type[Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    from campaign_manager.sending import engine

    monkeypatch.setattr(engine, "MAX_BACKOFF", 0.05)
    _config(tmp_path, 'notifier = "recorder"')
    cid = _campaign(cm, ["a@example.com", "b@example.com"])
    recorder.down = 3
    cm(f"campaign send {cid} --wait")
    rows = cm(f"campaign deliveries {cid} --json").json()
    assert [(r["status"], r["attempts"]) for r in rows] == [("sent", 1), ("sent", 1)]


def test_an_outage_longer_than_max_outage_pauses_the_campaign(
    cm: Cm, tmp_path: Path, recorder: type[Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    from campaign_manager.sending import engine

    monkeypatch.setattr(engine, "MAX_BACKOFF", 0.05)
    _config(tmp_path, 'notifier = "recorder"\nmax_outage = 0.2')
    cid = _campaign(cm, ["a@example.com"])
    recorder.down = 10_000
    cm(f"campaign send {cid} --wait")
    stats = _stats(cm, cid)
    assert stats["status"] == "paused" and "421 service not available" in stats["reason"]
    assert (stats["pending"], stats["attempts"]) == (1, 0)
    recorder.down = 0
    cm(f"campaign resume {cid}")
    cm("worker --drain")
    assert _stats(cm, cid)["status"] == "sent"


def test_an_opt_out_committed_before_a_claim_is_honoured(
    cm: Cm, db_url: str, tmp_path: Path, recorder: type[Recorder]
) -> None:
    _config(tmp_path, 'notifier = "recorder"\nclaim_batch = 1')
    cid = _campaign(cm, ["first@example.com", "second@example.com", "third@example.com"])

    def opt_out_third(messages: Sequence[Message]) -> None:
        if messages[0].to == "first@example.com":
            cm("recipient opt-out third@example.com --reason 'while sending'")

    recorder.on_batch = opt_out_third
    cm(f"campaign send {cid} --wait")
    assert [m.to for m in recorder.received] == ["first@example.com", "second@example.com"]
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    assert (rows["third@example.com"]["status"], rows["third@example.com"]["error"]) == ("skipped", "opted out")
    assert _stats(cm, cid)["status"] == "sent"


def test_cancel_skips_what_is_pending(cm: Cm, tmp_path: Path, recorder: type[Recorder]) -> None:
    _config(tmp_path, 'notifier = "recorder"')
    cid = _campaign(cm, ["a@example.com", "b@example.com"])
    cm(f"campaign send {cid}")
    assert "2 pending deliveries skipped" not in cm(f"campaign cancel {cid}").stderr  # the ledger is not written yet
    cm("worker --drain")
    assert recorder.received == []
    assert _stats(cm, cid)["status"] == "cancelled"
    assert_error(cm(f"campaign send {cid}", ok=False), 4, "cancelled")


def test_a_scheduled_send_found_too_late_is_paused(cm: Cm, tmp_path: Path, recorder: type[Recorder]) -> None:
    _config(tmp_path, 'notifier = "recorder"\nmax_delay = 60')
    cid = _campaign(cm, ["a@example.com"])
    cm(f"campaign send {cid} --at 2020-01-01T09:00:00+00:00")
    cm("worker --drain")
    stats = _stats(cm, cid)
    assert (stats["status"], stats["reason"], stats["sent"]) == ("paused", "late", 0)
    assert recorder.received == []


def test_at_without_an_offset_is_local_time_and_a_bad_one_is_refused(cm: Cm, tmp_path: Path) -> None:
    from campaign_manager.sending.service import parse_at

    assert parse_at("2026-12-01T09:00+02:00").isoformat() == "2026-12-01T07:00:00+00:00"
    assert parse_at("2026-12-01T09:00").tzinfo is not None
    _config(tmp_path, 'notifier = "outbox"')
    cid = _campaign(cm, ["a@example.com"])
    assert_error(cm(f"campaign send {cid} --at tomorrow", ok=False), 2, "--at 'tomorrow' is not an ISO 8601 time")
    assert_error(cm(f"campaign send {cid} --at 0001-01-01T00:30+01:00", ok=False), 2, "out of range")
    assert_error(cm(f"campaign send {cid} --rate 0", ok=False), 2, "--rate must be more than 0")


def test_undefined_variable_fails_that_delivery_only(cm: Cm, tmp_path: Path, recorder: type[Recorder]) -> None:
    _config(tmp_path, 'notifier = "recorder"')
    cid = _campaign(cm, ["a@example.com", "b@example.com"], text="Hi {{ city }}\n{{ unsubscribe_url }}")
    cm("recipient update a@example.com --attr city=Paris")
    cm(f"campaign send {cid} --wait")
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    assert rows["a@example.com"]["status"] == "sent"
    assert rows["b@example.com"]["status"] == "failed" and "city" in rows["b@example.com"]["error"]
    assert [m.to for m in recorder.received] == ["a@example.com"]


def test_test_copy_preview_and_token_opt_out(cm: Cm, tmp_path: Path) -> None:
    _config(tmp_path, 'notifier = "outbox"\n[unsubscribe]\nmailto = "unsub@example.com"')
    cid = _campaign(cm, ["ada@example.com", "alan@example.com"])
    shown = cm(f"campaign preview {cid} --recipient ada@example.com").stdout
    assert "Subject: Hello" in shown and "Dear ada@example.com" in shown
    cm(f"campaign send {cid} --test-to tester@example.com --recipient ada@example.com")
    [copy] = (tmp_path / "out").iterdir()
    assert email.message_from_bytes(copy.read_bytes())["To"] == "tester@example.com"
    assert _stats(cm, cid)["total"] == 0  # the ledger is untouched
    cm("recipient opt-out alan@example.com")
    assert_error(cm(f"campaign send {cid} --test-to alan@example.com", ok=False), 5, "may not be mailed")
    cm(f"campaign send {cid} --wait")
    sent = [f for f in (tmp_path / "out").iterdir() if f != copy]
    message = email.message_from_bytes(sent[0].read_bytes())
    link = message["List-Unsubscribe"]
    token = link.split("subject=unsubscribe%20", 1)[1].split(">", 1)[0]
    cm(f"recipient opt-out --token {token}")
    assert cm("recipient show ada@example.com --json").json()["status"] == "opted_out"
    assert_error(cm("recipient opt-out --token not-a-token", ok=False), 2)


def test_update_and_delete_are_for_drafts(cm: Cm, tmp_path: Path) -> None:
    _config(tmp_path, 'notifier = "outbox"')
    cid = _campaign(cm, ["a@example.com"])
    assert_error(cm(f"campaign update {cid} --subject 'Hi {{{{ name'", ok=False), 2, "subject")
    cm(f"campaign update {cid} --subject 'Hi {{{{ name }}}}'")
    cm(f"campaign send {cid} --wait")
    assert_error(cm(f"campaign update {cid} --title x", ok=False), 4, "only a draft")
    assert_error(cm(f"campaign delete {cid}", ok=False), 4, "only a draft")
    other = int(cm("campaign create --title t2 --subject s --text x --json").json()["id"])
    cm(f"campaign delete {other}")
    assert_error(cm(f"campaign show {other}", ok=False), 3)


def test_forget_anonymises_deliveries_and_keeps_the_counts(cm: Cm, tmp_path: Path) -> None:
    _config(tmp_path, 'notifier = "outbox"')
    cid = _campaign(cm, ["ada@example.com", "bob@example.com"])
    cm(f"campaign send {cid} --wait")
    exported = json.loads(cm("recipient export bob@example.com").stdout)
    assert [(d["campaign_id"], d["status"]) for d in exported["deliveries"]] == [(cid, "sent")]
    cm("recipient forget bob@example.com")
    rows = cm(f"campaign deliveries {cid} --json").json()
    assert sorted((r["email"] or "", r["status"]) for r in rows) == [("", "sent"), ("ada@example.com", "sent")]
    assert [r["recipient_id"] for r in rows if r["email"] is None] == [None]
    assert _stats(cm, cid)["sent"] == 2


def test_the_migration_lists_drafts_whose_templates_do_not_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlalchemy as sa

    from campaign_manager import db

    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0002")
    with db.get_engine(url).begin() as conn:
        for cid, body in ((1, "Hello {{ name }}"), (2, "Hello {{ name"), (3, "No template")):
            conn.execute(
                sa.text(
                    "INSERT INTO campaign (id, title, subject, body_text, status, created_at, updated_at)"
                    " VALUES (:id, 't', 's', :body, 'draft', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                ),
                {"id": cid, "body": body},
            )
    db.dispose_engines()
    db.upgrade(url)
    err = capsys.readouterr().err
    assert "campaign 2's text is now a template and does not compile" in err
    assert "campaign 1" not in err and "campaign 3" not in err


def test_a_phone_notifier_plugin_sends_through_its_entry_point_and_skips_who_has_no_phone(
    cm: Cm, tmp_path: Path, gateway_server: Any
) -> None:
    # The example third-party plugin (examples/cm-sms-gateway, installed by `make test`) in a whole campaign.
    (tmp_path / "campaign.toml").write_text(
        f'[send]\nnotifier = "sms"\nfrom = "News <news@example.com>"\n\n[notifiers.sms]\nurl = "{gateway_server.url}"\n'
        'api_key = "k3y"\n',
        encoding="utf-8",
    )
    cid = _campaign(cm, ["ada@example.com", "bob@example.com"], text="Sale for {{ name }}!")
    cm("recipient update ada@example.com --phone '+44 7700 900123' --name Ada")
    cm(f"campaign send {cid} --wait --no-unsubscribe-link")
    assert [r.json()["text"] for r in gateway_server.requests] == ["Sale for Ada!"]
    assert gateway_server.requests[0].json()["to"] == "+44 7700 900123"
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    assert (rows["ada@example.com"]["status"], rows["bob@example.com"]["status"]) == ("sent", "skipped")
    assert rows["bob@example.com"]["error"] == "no phone"


def test_a_test_token_opts_nobody_out(cm: Cm, tmp_path: Path) -> None:
    _config(tmp_path, 'notifier = "outbox"\n[unsubscribe]\nmailto = "unsub@example.com"')
    cid = _campaign(cm, ["ada@example.com"])
    cm(f"campaign send {cid} --test-to ada@example.com")
    [copy] = (tmp_path / "out").iterdir()
    link = email.message_from_bytes(copy.read_bytes())["List-Unsubscribe"]
    token = link.split("subject=unsubscribe%20", 1)[1].split(">", 1)[0]
    assert "nothing to do" in cm(f"recipient opt-out --token {token}").stderr
    assert cm("recipient show ada@example.com --json").json()["status"] == "active"
