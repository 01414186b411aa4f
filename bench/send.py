"""Sending speed of the `email` notifier: N messages, rendered beforehand, through `EmailNotifier.stream` to postfix's
smtp-sink (scripts/smtp-sink.sh fetches it), beside floors measured in the same run as interleaved rounds (each
round runs every case once, in a rotating order; the figure is the median of the rounds):

- **aiosmtplib `sendmail`** of the same pre-rendered bytes over the same number of connections, each connection
  taking the next message when it is done with the last: plain aiosmtplib, one command and one reply at a time;
- the notifier against **smtp-sink -p**, which does not announce PIPELINING, beside the same floor (aiosmtplib never
  pipelines, so the announcement changes nothing for it).

Connections are opened before the clock starts and closed after it stops, for every case alike. Every result is
checked: a run in which any message was not accepted counts as failed, so a broken sender cannot look fast.

`bench_campaign_send` is the issue's whole figure (a campaign sent by cm, beside aiosmtplib with and without cm's
rendering per message); bench/campaign.py calls it with a campaign sent by `cm campaign send --wait`.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from bench.report import Baseline, Figure, Report, Target
from campaign_manager.notifiers import Message
from campaign_manager.notifiers.email import EmailNotifier, EmailSettings

SCRIPT = Path(__file__).parent.parent / "scripts" / "smtp-sink.sh"
HOST = "127.0.0.1"
PIPELINING_TARGET = 1.5  # x the pre-rendered floor: the target for the whole send, which renders too
PLAIN_TARGET = 0.9  # x the floor, against a server without PIPELINING
CAMPAIGN_RENDERING_TARGET = 2.0  # the targets for the whole campaign send
CAMPAIGN_PRERENDERED_TARGET = 1.5
BODY = (
    "Hello Person {i:07d},\r\n\r\nThis is issue {i} of the newsletter for you, personalised as cm renders it: your"
    " city, your plan and\r\nthe links that are yours. The paragraphs below are the same for everyone.\r\n\r\n"
    + "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.\r\n" * 6
    + ".A line that starts with a dot, which dot-stuffing doubles.\r\n\r\nUnsubscribe: https://example.com/u/{token}\r\n"
)


@dataclass
class Sink:
    """A running smtp-sink on 127.0.0.1."""

    port: int
    process: subprocess.Popen[bytes]
    host: str = HOST
    flags: tuple[str, ...] = ()  # smtp-sink's options: "-p" turns PIPELINING off

    @classmethod
    def start(cls, *flags: str) -> Sink:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = int(probe.getsockname()[1])
        argv = ["bash", str(SCRIPT), *flags, f"{HOST}:{port}", "1000"]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300  # the first run fetches postfix
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return cls(port, process, flags=flags)
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    err = process.communicate()[1].decode().strip()
                    raise RuntimeError(f"smtp-sink did not start: {err[-500:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=10)


def render_messages(count: int) -> list[Message]:
    """`count` distinct messages as cm renders them (headers with a Message-ID and List-Unsubscribe, ~1.4 KB)."""
    items = []
    for i in range(count):
        token = f"{i:08x}{(i * 2654435761) % 2**32:08x}"
        to = f"user{i:07d}@example.com"
        head = (
            f"From: News <news@example.com>\r\nTo: Person {i:07d} <{to}>\r\nSubject: Your news, Person {i:07d}\r\n"
            f"Date: Mon, 01 Jun 2026 10:00:00 +0000\r\nMessage-ID: <{i}.bench@example.com>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n"
            f"List-Unsubscribe: <mailto:unsubscribe@example.com?subject={token}>, <https://example.com/u/{token}>\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\n"
        )
        data = (head + BODY.format(i=i, token=token)).encode()
        items.append(Message(f"1-{i}", to, "News <news@example.com>", "news@example.com", "", "", None, data))
    return items


async def cm_stream(sink: Sink, items: Sequence[Message], connections: int) -> float:
    """Seconds for EmailNotifier.stream to send `items` (connections opened before the clock)."""
    notifier = EmailNotifier(
        EmailSettings(host=sink.host, port=sink.port, tls="none", connections=connections, helo="bench.example.com")
    )
    await notifier.open()

    async def feed() -> AsyncIterator[Message]:
        for item in items:
            yield item

    sent = 0
    start = time.perf_counter()
    async for _, result in notifier.stream(feed()):
        if result.outcome != "sent":
            raise RuntimeError(f"not sent: {result.reason}")
        sent += 1
    seconds = time.perf_counter() - start
    await notifier.close()
    if sent != len(items):
        raise RuntimeError(f"{sent} of {len(items)} sent")
    return seconds


async def aiosmtplib_sendmail(
    sink: Sink, items: Sequence[Message], connections: int, render: Callable[[int], Message] | None = None
) -> float:
    """Seconds for plain aiosmtplib `sendmail` over `connections` connections, each taking the next message when
    it is done; `render(i)`: render message i inside the loop instead of taking `items[i]`."""
    clients = [
        aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False, local_hostname="bench.example.com")
        for _ in range(connections)
    ]
    await asyncio.gather(*(client.connect() for client in clients))
    numbers = iter(range(len(items)))

    async def work(client: aiosmtplib.SMTP) -> None:
        for i in numbers:
            item = render(i) if render is not None else items[i]
            errors, _ = await client.sendmail(item.envelope_from, [item.to], item.data)
            if errors:
                raise RuntimeError(f"refused: {errors}")

    start = time.perf_counter()
    await asyncio.gather(*(work(client) for client in clients))
    seconds = time.perf_counter() - start
    await asyncio.gather(*(client.quit() for client in clients))
    return seconds


def interleave(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each case in each round; every round runs every case once, starting one further along."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            gc.collect()
            samples[name].append(cases[name]())
    return samples


def _rate(count: int, seconds: list[float]) -> tuple[float, str]:
    rates = sorted(count / s for s in seconds)
    return statistics.median(rates), f"rounds {', '.join(f'{r:,.0f}' for r in rates)}"


def bench_send(report: Report, *, messages: int, rounds: int, connections: int) -> None:
    report.section(
        f"sending {messages:,} pre-rendered messages through the email notifier to smtp-sink,"
        f" {connections} connections, median of {rounds} interleaved rounds"
    )
    try:
        sink, plain_sink = Sink.start(), Sink.start("-p")
    except (RuntimeError, OSError) as exc:
        report.note(f"send: not available: {exc}")
        return
    try:
        items = render_messages(messages)
        report.note(f"messages: {len(items[0].data):,} bytes each; rendered before the clock")
        cases = {
            "cm, PIPELINING": lambda: asyncio.run(cm_stream(sink, items, connections)),
            "cm, smtp-sink -p (no PIPELINING)": lambda: asyncio.run(cm_stream(plain_sink, items, connections)),
            "aiosmtplib sendmail": lambda: asyncio.run(aiosmtplib_sendmail(sink, items, connections)),
        }
        samples = interleave(cases, rounds)
    except Exception as exc:  # a failed run: say so, keep the other benchmarks going
        report.note(f"send: failed: {type(exc).__name__}: {exc}")
        return
    finally:
        sink.stop()
        plain_sink.stop()
    (floor, floor_detail), figures = _rate(messages, samples["aiosmtplib sendmail"]), []
    baseline = Baseline("aiosmtplib sendmail, pre-rendered (floor)", floor)
    for name in ("cm, PIPELINING", "cm, smtp-sink -p (no PIPELINING)"):
        rate, detail = _rate(messages, samples[name])
        figures.append(Figure(f"email notifier, {name[4:]}", rate, "msg/s", detail, (baseline,)))
    figures.append(Figure("aiosmtplib sendmail (floor)", floor, "msg/s", floor_detail))
    report.table(figures)
    for figure, limit in zip(figures[:2], (PIPELINING_TARGET, PLAIN_TARGET), strict=True):
        note = "the notifier alone; the issue's target is for the whole send, rendering included"
        report.target(Target(f"{figure.name} / floor", limit, "x", True, figure.value / floor, note))


def bench_campaign_send(
    report: Report,
    *,
    recipients: int,
    rounds: int,
    connections: int,
    run_campaign: Callable[[Sink], float],
    render: Callable[[int], Message],
) -> None:
    """The issue's figure (bench/campaign.py calls it): `run_campaign(sink)` sends a campaign of `recipients`
    through cm's email notifier (`connections` of them) to `sink` and returns the seconds of its sending phase
    (first claim until nothing is pending); `render(i)` renders recipient i's message as cm does (sandboxed Jinja
    subject and body, token, headers). Interleaved rounds of: the campaign; aiosmtplib with messages rendered
    beforehand by `render`; aiosmtplib calling `render` per message; the campaign and the rendering floor again
    against smtp-sink -p. Targets: >= 2x the rendering floor and >= 1.5x the pre-rendered one with PIPELINING,
    >= 0.9x the rendering floor without it."""
    report.section(f"campaign send, {recipients:,} recipients, to smtp-sink, median of {rounds} rounds")
    sink, plain_sink = Sink.start(), Sink.start("-p")
    try:
        items = [render(i) for i in range(recipients)]
        cases = {
            "campaign": lambda: run_campaign(sink),
            "pre-rendered": lambda: asyncio.run(aiosmtplib_sendmail(sink, items, connections)),
            "rendering": lambda: asyncio.run(aiosmtplib_sendmail(sink, items, connections, render)),
            "campaign -p": lambda: run_campaign(plain_sink),
            "rendering -p": lambda: asyncio.run(aiosmtplib_sendmail(plain_sink, items, connections, render)),
        }
        samples = interleave(cases, rounds)
    finally:
        sink.stop()
        plain_sink.stop()
    rates = {name: _rate(recipients, seconds) for name, seconds in samples.items()}
    floors = {name: Baseline(f"aiosmtplib, {name}", rates[name][0]) for name in ("pre-rendered", "rendering")}
    plain_floor = Baseline("aiosmtplib, rendering, smtp-sink -p", rates["rendering -p"][0])
    campaign, plain = rates["campaign"], rates["campaign -p"]
    report.table(
        [
            Figure("cm campaign send, sending phase", campaign[0], "msg/s", campaign[1], tuple(floors.values())),
            Figure("cm campaign send, smtp-sink -p", plain[0], "msg/s", plain[1], (plain_floor,)),
        ]
    )
    pairs = ((floors["rendering"], CAMPAIGN_RENDERING_TARGET), (floors["pre-rendered"], CAMPAIGN_PRERENDERED_TARGET))
    for floor, limit in pairs:
        report.target(Target(f"campaign send / {floor.name}", limit, "x", True, campaign[0] / floor.value))
    ratio = plain[0] / plain_floor.value
    report.target(Target("campaign send, no PIPELINING / rendering floor", PLAIN_TARGET, "x", True, ratio))
