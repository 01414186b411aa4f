"""Campaigns sent through the `email` notifier to a real SMTP server (aiosmtpd on 127.0.0.1, tests/smtp_server.py),
on SQLite and PostgreSQL: what the server receives against the ledger, per-recipient faults, a server down when
the send starts, and a worker killed with SIGKILL mid-send (the duplicate bound the README states)."""

from __future__ import annotations

import email
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from email import policy
from pathlib import Path
from typing import Any

import pytest

from conftest import CM_BIN, Run
from smtp_server import SmtpServer

Cm = Callable[..., Run]


def _config(tmp_path: Path, server: SmtpServer, extra: str = "", *, connections: int = 4) -> Path:
    path = tmp_path / "campaign.toml"
    path.write_text(
        '[send]\nnotifier = "email"\nfrom = "News <news@example.com>"\nretry_delay = 0.2\nrecord_interval = 0.05\n'
        f"{extra}\n"
        '[unsubscribe]\nmailto = "unsubscribe@example.com"\nurl = "https://example.com/u/{token}"\n\n'
        f'[notifiers.email]\nhost = "{server.host}"\nport = {server.port}\ntls = "none"\n'
        f"connections = {connections}\ntimeout = 5\n",
        encoding="utf-8",
    )
    return path


def _campaign(cm: Cm, count: int, *, domain: str = "example.org") -> int:
    cm("group create news")
    rows = "email,name,city\n" + "".join(f"p{i:05d}@{domain},Pérson {i},Zürich\n" for i in range(count))
    Path("people.csv").write_text(rows, encoding="utf-8")
    cm("group add-recipients news --csv people.csv --wait")
    made = cm(
        [
            "campaign", "create", "--title", "t", "--subject", "Grüße, {{ name }}", "--group", "news", "--json",
            "--text", "Hello {{ name }} in {{ city }}.\n.a line starting with a dot\n{{ unsubscribe_url }}\n",
        ]
    )  # fmt: skip
    return int(made.json()["id"])


def _stats(cm: Cm, cid: int) -> dict[str, Any]:
    return dict(cm(f"campaign stats {cid} --json").json())


def test_every_recipient_gets_one_message_that_parses_back(cm: Cm, tmp_path: Path, smtp_server: SmtpServer) -> None:
    _config(tmp_path, smtp_server)
    cid = _campaign(cm, 60)
    cm(f"campaign send {cid} --wait")
    received = Counter(rcpt for m in smtp_server.messages for rcpt in m.rcpt)
    assert len(received) == 60 and set(received.values()) == {1}
    stats = _stats(cm, cid)
    assert (stats["status"], stats["sent"], stats["attempts"], stats["possible_duplicates"]) == ("sent", 60, 60, 0)
    sample = next(m for m in smtp_server.messages if m.rcpt == ["p00007@example.org"])
    parsed = email.message_from_bytes(sample.data, policy=policy.default)
    assert str(parsed["Subject"]) == "Grüße, Pérson 7"
    assert str(parsed["To"]) == "Pérson 7 <p00007@example.org>"
    body = parsed.get_content().replace("\r\n", "\n")
    assert body.startswith("Hello Pérson 7 in Zürich.\n.a line starting with a dot\nhttps://example.com/u/")
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "mailto:unsubscribe@example.com" in parsed["List-Unsubscribe"]
    assert parsed["Message-ID"].endswith("@example.com>")
    # The ledger names the message the server took: its Message-ID is the provider id or in it.
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    assert rows["p00007@example.org"]["status"] == "sent" and rows["p00007@example.org"]["provider_id"]


def test_per_recipient_replies_become_the_right_ledger_states(cm: Cm, tmp_path: Path, smtp_server: SmtpServer) -> None:
    _config(tmp_path, smtp_server, "max_attempts = 3")
    cid = _campaign(cm, 6)
    smtp_server.reply("RCPT", "550 5.1.1 no such user", to="p00001@example.org")
    smtp_server.reply("RCPT", "451 4.7.1 greylisted", to="p00002@example.org", times=1)
    smtp_server.reply("RCPT", "552 5.2.2 mailbox full", to="p00003@example.org", times=1)  # counts as 452
    smtp_server.reply(".", "554 5.6.0 message refused", to="p00004@example.org")
    smtp_server.reply("RCPT", "452 4.2.2 over quota", to="p00005@example.org")
    cm(f"campaign send {cid} --wait")
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    states = {e.split("@")[0]: (r["status"], r["attempts"]) for e, r in rows.items()}
    assert states == {
        "p00000": ("sent", 1),
        "p00001": ("failed", 1),
        "p00002": ("sent", 2),
        "p00003": ("sent", 2),
        "p00004": ("failed", 1),
        "p00005": ("failed", 3),
    }
    assert "550 5.1.1" in rows["p00001@example.org"]["error"]
    assert cm("recipient show p00001@example.org --json").json()["status"] == "bounced"
    assert cm("recipient show p00004@example.org --json").json()["status"] == "active"  # refused, not a bounce
    stats = _stats(cm, cid)
    assert (stats["hard_bounces"], stats["failed"], stats["sent"]) == (1, 3, 3)


def test_a_server_down_when_the_send_starts_is_waited_for(
    cm: Cm, tmp_path: Path, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from campaign_manager.sending import engine

    monkeypatch.setattr(engine, "MAX_BACKOFF", 0.2)
    _config(tmp_path, smtp_server)
    cid = _campaign(cm, 5)
    smtp_server.stop()
    started = time.monotonic()

    def back_up() -> None:
        time.sleep(1.0)
        smtp_server.start()

    import threading

    threading.Thread(target=back_up, daemon=True).start()
    cm(f"campaign send {cid} --wait")
    assert time.monotonic() - started >= 1.0
    stats = _stats(cm, cid)
    assert (stats["status"], stats["sent"], stats["attempts"]) == ("sent", 5, 5)  # the outage cost no attempt
    assert sorted(r for m in smtp_server.messages for r in m.rcpt) == [f"p{i:05d}@example.org" for i in range(5)]


def test_a_drop_after_the_data_is_retried_and_counted_as_a_possible_duplicate(
    cm: Cm, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    _config(tmp_path, smtp_server, connections=1)
    cid = _campaign(cm, 3)
    smtp_server.disconnect(".", to="p00001@example.org", times=1)
    cm(f"campaign send {cid} --wait")
    stats = _stats(cm, cid)
    assert (stats["status"], stats["sent"], stats["possible_duplicates"]) == ("sent", 3, 1)
    rows = {r["email"]: r for r in cm(f"campaign deliveries {cid} --json").json()}
    assert rows["p00001@example.org"]["possible_duplicate"] is True
    assert rows["p00001@example.org"]["attempts"] == 2
    assert Counter(r for m in smtp_server.messages for r in m.rcpt)["p00001@example.org"] == 2


def _worker(tmp_path: Path, config: Path, url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CM_CONFIG": str(config), "CM_DATABASE_URL": url}
    return subprocess.Popen(
        [str(CM_BIN), "worker", "--drain"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_sigkill_mid_send_loses_nobody_and_resends_within_the_bound(
    cm: Cm, db_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    connections, record_batch, count = 4, 100, 1500
    config = _config(
        tmp_path, smtp_server, f"record_batch = {record_batch}\nclaim_batch = 200\n[worker]\nlease_seconds = 2",
        connections=connections,
    )  # fmt: skip
    cid = _campaign(cm, count)
    cm(f"campaign send {cid}")
    worker = _worker(tmp_path, config, db_url)
    deadline = time.monotonic() + 60
    while len(smtp_server.messages) < count // 3 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.01)
    before_kill = len(smtp_server.messages)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert count // 3 <= len(smtp_server.messages) < count, "the kill came too late to test anything"
    time.sleep(2.5)  # the dead worker's job and claims expire
    again = _worker(tmp_path, config, db_url)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    received = Counter(r for m in smtp_server.messages for r in m.rcpt)
    assert len(received) == count  # nobody lost
    resent = sum(n - 1 for n in received.values())
    print(f"sent before the kill: {before_kill}, resent after it: {resent}")
    # In flight, per connection: a message whose reply was read but not yet handed to the recorder, and the next
    # one, whose data went out behind it (PIPELINING); then the results not yet written.
    assert resent <= 2 * connections + record_batch, f"{resent} messages went out twice"
    stats = _stats(cm, cid)
    assert (stats["status"], stats["sent"], stats["pending"]) == ("sent", count, 0)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_send_wait_records_what_went_out_and_pauses(
    cm: Cm, db_url: str, tmp_path: Path, smtp_server: SmtpServer, signum: int, code: int
) -> None:
    config = _config(tmp_path, smtp_server, "record_batch = 10", connections=2)
    cid = _campaign(cm, 400)
    smtp_server.stall(".", 0.01)  # ~100 messages a second a connection: the signal lands mid-send
    env = {**os.environ, "CM_CONFIG": str(config), "CM_DATABASE_URL": db_url}
    proc = subprocess.Popen(
        [str(CM_BIN), "campaign", "send", str(cid), "--wait"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(smtp_server.messages) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"interrupted: campaign {cid} paused" in err and "Traceback" not in err
    stats = _stats(cm, cid)
    assert stats["status"] == "paused" and stats["reason"].startswith("interrupted by SIG")
    acknowledged = sum(1 for m in smtp_server.messages if m.acknowledged)
    assert stats["sent"] == acknowledged  # every message the server took is in the ledger: none to resend
    smtp_server.faults.clear()
    cm(f"campaign resume {cid}")
    cm("worker --drain")
    received = Counter(r for m in smtp_server.messages for r in m.rcpt)
    assert len(received) == 400 and max(received.values()) == 1
    assert _stats(cm, cid)["status"] == "sent"
