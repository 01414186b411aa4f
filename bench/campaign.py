"""The issue's whole send figure: a campaign sent by cm (`cm campaign send ID --wait`, a real process) to postfix's
smtp-sink, beside plain aiosmtplib with and without cm's own rendering per message (`bench.send.bench_campaign_send`
runs the interleaved rounds and reports the targets); and the peak RSS of a send to 1,000,000 recipients.

The database is built in each run, in the bench's temp folder: `cm db upgrade`, a group, N recipients imported with
`cm group add-recipients GROUP --csv FILE --wait` (recipient i is `user{i:07d}@...`, named from bench.gen's lists,
some names not ASCII, with a city, some needing CSV quoting, and a plan), then a draft campaign to the group whose
subject and text body are templates (~1.3 KB once rendered, like bench/send.py's messages). Building it takes
seconds against minutes of sending, and a cached database would outlive the schema of the cm that made it. Each send
runs on a fresh copy of it, so that every round sends a campaign never sent before to the same database (the ledgers
of earlier rounds do not grow the delivery table).

What a send reports comes from its job (`cm jobs list --json`): "sending_seconds" (first claim until nothing is
pending) is the figure; the wall time less it is start-up plus the ledger's creation, split further with the job's
own timestamps. A send that did not mail every recipient exactly once counts as failed, so a broken send cannot
look fast.
"""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import proc
from bench.gen import CITIES, DOMAINS, FIRST, LAST, PLANS
from bench.imports import Bench
from bench.report import Baseline, Figure, Target
from bench.send import Sink, bench_campaign_send
from campaign_manager.config import load_settings
from campaign_manager.db import dispose_engines, open_session
from campaign_manager.notifiers import Message, Need
from campaign_manager.sending.campaigns import get_campaign
from campaign_manager.sending.render import Target as RenderTarget
from campaign_manager.sending.service import make_renderer

RSS_TARGET_MB = 150.0
MILLION = 1_000_000
GROUP = "news"
FROM = "News <news@example.com>"
UNSUBSCRIBE_URL = "https://example.com/u/{token}"
SUBJECT = "News for {{ name }}"
TEXT = (
    "Hello {{ name }},\n\nThis is this month's newsletter for you, personalised as cm renders it: news from {{ city }},"
    " what is new on\nthe {{ plan }} plan and the links that are yours. The paragraphs below are the same for"
    " everyone.\n\n"
    + "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.\n" * 6
    + ".A line that starts with a dot, which dot-stuffing doubles.\n\nUnsubscribe: {{ unsubscribe_url }}\n"
)


@dataclass(frozen=True)
class Template:
    """A database ready to send from: `recipients` recipients in one group and draft campaign `campaign_id`."""

    path: Path
    recipients: int
    campaign_id: int
    seconds: float  # to build it


@dataclass(frozen=True)
class SendRun:
    """One `cm campaign send --wait`, as its process and its job saw it."""

    wall: float
    sending: float  # the job's "sending_seconds"
    startup: float  # launch until the job was created
    job: float  # the job's own run: the ledger, set-up and the sending phase
    peak_rss_mb: float

    @property
    def before_sending(self) -> float:
        """Wall time less the sending phase: start-up plus ledger creation, and the stats printed after the job."""
        return self.wall - self.sending

    @property
    def ledger(self) -> float:
        return self.job - self.sending

    @property
    def after(self) -> float:
        return self.wall - self.startup - self.job


def bench_campaign(bench: Bench, *, recipients: int, rounds: int, connections: int) -> None:
    """`bench_campaign_send` with a real campaign, then the parts of the wall time its figure leaves out."""
    report = bench.report
    folder = bench.work / "campaign"
    runs: dict[str, list[SendRun]] = {}
    try:
        template = build_template(bench, folder, recipients=recipients)
        render = make_render(template, write_config(folder / "render.toml", None, connections))
        size = len(render(0).data)

        def run_campaign(sink: Sink) -> float:
            run = send_campaign(bench, template, sink, connections=connections, copy=True)
            runs.setdefault(_sink_name(sink), []).append(run)
            return run.sending

        bench_campaign_send(
            report,
            recipients=recipients,
            rounds=rounds,
            connections=connections,
            run_campaign=run_campaign,
            render=render,
        )
    except Exception as exc:  # a failed run: say so, keep the other benchmarks going
        report.note(f"campaign send: failed: {type(exc).__name__}: {exc}")
        report.target(Target("campaign send / aiosmtplib floors", 1.0, "x", True, None, "failed"))
        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report.note(
        f"database: {recipients:,} recipients imported and a draft campaign made in {template.seconds:.1f} s, copied"
        f" for each send; messages ~{size:,} bytes. The rest of each send's wall time (medians):"
    )
    figures = []
    for name, done in runs.items():
        parts = (
            f"start-up {_median(done, lambda r: r.startup):.2f} s, ledger and set-up"
            f" {_median(done, lambda r: r.ledger):.2f} s, after the job {_median(done, lambda r: r.after):.2f} s"
        )
        walls = ", ".join(f"{r.wall:.2f}" for r in done)
        rss = ", ".join(f"{r.peak_rss_mb:.0f}" for r in done)
        figures += [
            Figure(f"start-up plus ledger creation, {name}", _median(done, lambda r: r.before_sending), "s", parts),
            Figure(f"cm campaign send --wait, wall, {name}", _median(done, lambda r: r.wall), "s", f"rounds {walls}"),
            Figure(f"peak RSS, {name}", max(r.peak_rss_mb for r in done), "MB", f"rounds {rss}"),
        ]
    report.table(figures)


def bench_million(bench: Bench, *, connections: int, recipients: int = MILLION) -> None:
    """The peak RSS of one `cm campaign send --wait` to `recipients` (the issue: at most 150 MB), with its rate."""
    report = bench.report
    report.section(f"campaign send, {recipients:,} recipients, to smtp-sink: peak RSS (the process doing the send)")
    folder = bench.work / "million"
    timeout = max(bench.timeout, 3600.0)
    try:
        template = build_template(bench, folder, recipients=recipients)
        report.note(
            f"campaign database: {recipients:,} recipients imported and a draft built in {template.seconds:.1f} s"
        )
        sink = Sink.start()
        try:
            run = send_campaign(bench, template, sink, connections=connections, copy=False, timeout=timeout)
        finally:
            sink.stop()
        stats = _cm(bench, template.path, "campaign", "stats", str(template.campaign_id), "--json", apart=True)
    except Exception as exc:  # a failed run: say so, keep the other benchmarks going
        report.note(f"campaign send to {recipients:,}: failed: {type(exc).__name__}: {exc}")
        report.target(Target(f"campaign send to {recipients:,}, peak RSS", RSS_TARGET_MB, "MB", False, None, "failed"))
        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rss_base = (Baseline("cm campaign stats, same database", stats.peak_rss_mb),)
    detail = (
        f"{recipients:,} in {run.sending:.1f} s; wall {run.wall:.1f} s: start-up {run.startup:.2f} s, ledger and"
        f" set-up {run.ledger:.1f} s, after the job {run.after:.2f} s"
    )
    report.table(
        [
            Figure("cm campaign send --wait, peak RSS", run.peak_rss_mb, "MB", "", rss_base),
            Figure("sending phase", recipients / run.sending, "msg/s", detail),
        ]
    )
    report.target(Target(f"campaign send to {recipients:,}, peak RSS", RSS_TARGET_MB, "MB", False, run.peak_rss_mb))


def build_template(bench: Bench, folder: Path, *, recipients: int) -> Template:
    """A database of `recipients` recipients in one group and a draft campaign to it, built through cm."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    path, csv_path, text = folder / "template.db", folder / "recipients.csv", folder / "body.txt"
    write_recipients(csv_path, recipients)
    text.write_text(TEXT, encoding="utf-8")
    _cm(bench, path, "db", "upgrade")
    _cm(bench, path, "group", "create", GROUP)
    imported = _cm(bench, path, "group", "add-recipients", GROUP, "--csv", str(csv_path), "--wait", "--json")
    counts = json.loads(imported.stdout)["counts"]
    if (counts.get("created"), counts.get("added")) != (recipients, recipients):
        raise RuntimeError(f"the import did not create {recipients:,} members: {counts}")
    create = ("campaign", "create", "--title", "bench", "--subject", SUBJECT, "--text-file", str(text))
    made = _cm(bench, path, *create, "--group", GROUP, "--json")
    campaign_id = int(json.loads(made.stdout)["id"])
    csv_path.unlink()
    with sqlite3.connect(path) as con:  # everything in the main file, so that a copy of it is the whole database
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return Template(path, recipients, campaign_id, time.perf_counter() - started)


def write_recipients(path: Path, count: int) -> None:
    """`count` distinct, valid recipients as CSV (`email,name,city,plan`)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("email", "name", "city", "plan"))
        for i in range(count):
            name = f"{FIRST[i % len(FIRST)]} {LAST[i // len(FIRST) % len(LAST)]}"
            email = f"user{i:07d}@{DOMAINS[i % len(DOMAINS)]}"
            writer.writerow((email, name, CITIES[i % len(CITIES)], PLANS[i % len(PLANS)]))


def write_config(path: Path, sink: Sink | None, connections: int) -> Path:
    """A campaign.toml sending through the email notifier to `sink` (None: a config only to render with)."""
    host, port = (sink.host, sink.port) if sink is not None else ("127.0.0.1", 25)
    path.write_text(
        f'[send]\nnotifier = "email"\nfrom = "{FROM}"\n\n'
        f'[notifiers.email]\nhost = "{host}"\nport = {port}\ntls = "none"\nconnections = {connections}\n\n'
        f'[unsubscribe]\nurl = "{UNSUBSCRIBE_URL}"\n',
        encoding="utf-8",
    )
    return path


def make_render(template: Template, config: Path) -> Callable[[int], Message]:
    """`render(i)`: recipient i's message (in id order) as cm's send renders it, with cm's own Renderer made the
    way the send job makes it (the same campaign, From, database id, signing secret and unsubscribe settings). The
    recipients are read beforehand, their attributes decoded: the send's claim does that, not its rendering."""
    settings = load_settings(str(config))
    try:
        with open_session(f"sqlite:///{template.path}", write=False) as session:
            campaign = get_campaign(session, template.campaign_id)
            renderer = make_renderer(session, settings, campaign, need=Need.EMAIL)
    finally:
        dispose_engines()
    with sqlite3.connect(template.path) as con:
        rows = con.execute("SELECT id, email, name, phone, attributes FROM recipient ORDER BY id").fetchall()
    targets = [
        RenderTarget(n, rid, email, name, phone, json.loads(attributes) if attributes else {})
        for n, (rid, email, name, phone, attributes) in enumerate(rows, start=1)
    ]
    if len(targets) != template.recipients:
        raise RuntimeError(f"{len(targets):,} recipients in the database, not {template.recipients:,}")
    return lambda i: renderer.render(targets[i])


def send_campaign(
    bench: Bench, template: Template, sink: Sink, *, connections: int, copy: bool, timeout: float | None = None
) -> SendRun:
    """`cm campaign send ID --wait` to `sink` (on a fresh copy of the template with `copy`), checked: every
    recipient sent once, nothing pending."""
    folder = template.path.parent
    database = folder / "send.db" if copy else template.path
    if copy:
        shutil.copyfile(template.path, database)
    config = write_config(folder / f"send-{sink.port}.toml", sink, connections)
    try:
        launched = time.time()
        argv = [proc.cm(), "--config", str(config), "--database", f"sqlite:///{database}"]
        argv += ["campaign", "send", str(template.campaign_id), "--wait", "--json"]
        out = bench.work / "out" / "send"
        run = proc.run_apart(argv, env=bench.env, cwd=bench.work, out_dir=out, timeout=timeout or bench.timeout)
        if not run.ok:
            raise RuntimeError(run.failure())
        job = _jobs(bench, database, kind="send")
        if len(job) != 1:
            raise RuntimeError(f"{len(job)} send jobs, not 1")
        counts = job[0]["counts"]
        sent, seconds = counts.get("sent"), counts.get("sending_seconds")
        if job[0]["status"] != "done" or sent != template.recipients or counts.get("pending") != 0:
            raise RuntimeError(f"send job {job[0]['status']}, {template.recipients:,} recipients: {counts}")
        if not isinstance(seconds, int | float) or seconds <= 0:
            raise RuntimeError(f"the send job reports no sending phase (sending_seconds): {counts}")
    finally:
        if copy:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{database}{suffix}").unlink(missing_ok=True)
    created, started, finished = (_time(job[0][k]) for k in ("created_at", "started_at", "finished_at"))
    return SendRun(
        wall=run.seconds,
        sending=float(seconds),
        startup=created - launched,
        job=finished - started,
        peak_rss_mb=run.peak_rss_mb,
    )


def _cm(bench: Bench, database: Path, *args: str, apart: bool = False) -> proc.Run:
    """cm on `database`; RuntimeError when it fails."""
    argv = [proc.cm(), "--database", f"sqlite:///{database}", *args]
    how = proc.run_apart if apart else proc.run
    run = how(argv, env=bench.env, cwd=bench.work, out_dir=bench.work / "out", timeout=bench.timeout)
    if not run.ok:
        raise RuntimeError(run.failure())
    return run


def _jobs(bench: Bench, database: Path, *, kind: str) -> list[dict[str, Any]]:
    jobs = json.loads(_cm(bench, database, "jobs", "list", "--json").stdout)
    return [job for job in jobs if job.get("kind") == kind]


def _time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _sink_name(sink: Sink) -> str:
    return "smtp-sink -p" if "-p" in sink.flags else "smtp-sink"


def _median(runs: list[SendRun], value: Callable[[SendRun], float]) -> float:
    return statistics.median(value(run) for run in runs)
