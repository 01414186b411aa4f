"""Rendering one message: `Renderer.render` for a personalised subject, text and HTML with both unsubscribe links,
beside, in the same run and interleaved, its floor (the same three templates through Jinja's sandbox and its public
`Template.render`: Jinja's part, which `render` cannot do without) and what building the same message through
`email.message.EmailMessage` costs (the stdlib's way, which the issue's rendering baseline pays).

    python -m bench.render                 # 7 rounds of 2,000 messages each
    python -m bench.render --rounds 15

Figures are CPU time (time.process_time) per 1,000 messages, so a busy machine's waiting is left out: read "ms per
1,000 messages" as "us per message"."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from bench.report import Baseline, Figure, Report
from campaign_manager.sections import UnsubscribeSettings
from campaign_manager.sending.render import Renderer, Target
from campaign_manager.sending.templates import RecipientView
from campaign_manager.sending.tokens import Purpose, make_token
from campaign_manager.tables.sending import Campaign

SUBJECT = "{{ name }}, the May news from {{ city }}"
TEXT = """Dear {{ name }},

Here is what happened in {{ city }} this month: {{ campaign.title }}.
Your plan: {{ recipient.attributes.plan }}.

Unsubscribe: {{ unsubscribe_url }}
"""
HTML = """<html><body><p>Dear {{ name }},</p>
<p>Here is what happened in {{ city }} this month: <b>{{ campaign.title }}</b>.</p>
<p>Your plan: {{ recipient.attributes.plan }}.</p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>
"""
SECRET = b"bench-secret-0123456789abcdef0123"


def targets(count: int) -> list[Target]:
    cities = ("Oslo", "Zürich", "Lyon", "Kraków")
    return [
        Target(
            i,
            i,
            f"person{i}@example.com",
            f"Zoë Person {i}" if i % 2 else f"Ann Person {i}",
            None,
            {"city": cities[i % 4], "plan": "<basic>" if i % 3 else "pro"},
        )
        for i in range(count)
    ]


def bench_render(report: Report, *, rounds: int = 7, messages: int = 2_000) -> None:
    report.section(f"rendering one message (CPU time per 1,000 messages, i.e. us per message; median of {rounds})")
    campaign = Campaign(id=7, title="May news", subject=SUBJECT, body_text=TEXT, body_html=HTML)
    unsubscribe = UnsubscribeSettings(mailto="unsubscribe@example.com", url="https://example.com/u/{token}")
    renderer = Renderer(
        campaign,
        from_header="News <news@example.com>",
        database_id="bench",
        secrets=[SECRET],
        unsubscribe=unsubscribe,
        max_message_bytes=10_000_000,
    )
    text_only = Renderer(
        Campaign(id=7, title="May news", subject=SUBJECT, body_text=TEXT),
        from_header="News <news@example.com>",
        database_id="bench",
        secrets=[SECRET],
        unsubscribe=unsubscribe,
        max_message_bytes=10_000_000,
    )
    people = targets(messages)
    jinja = _jinja_floor()
    stdlib = _email_message()
    # name -> (what renders one message, how many of the messages it renders: EmailMessage is 50 times slower)
    work: dict[str, tuple[Callable[[Target], Any], int]] = {
        "cm": (renderer.render, messages),
        "cm text": (text_only.render, messages),
        "floor": (jinja, messages),
        "stdlib": (stdlib, max(1, messages // 20)),
    }
    for render, count in work.values():  # warm up: compiled regexes, the hash pads, the date
        for target in people[:count]:
            render(target)
    runs: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds):
        for name, (render, count) in work.items():
            start = time.process_time()
            for target in people[:count]:
                render(target)
            runs[name].append((time.process_time() - start) * 1000 / count * 1000)
    median = {name: statistics.median(values) for name, values in runs.items()}
    report.table(
        [
            Figure(
                "Renderer.render",
                median["cm"],
                "ms",
                f"subject+text+html, 2 links; min {min(runs['cm']):.1f}",
                (
                    Baseline("the 3 templates by Template.render (sandbox)", median["floor"]),
                    Baseline("the same through EmailMessage", median["stdlib"]),
                ),
            ),
            Figure(
                "Renderer.render", median["cm text"], "ms", f"subject+text, 2 links; min {min(runs['cm text']):.1f}"
            ),
        ]
    )
    size = len(renderer.render(people[1]).data)
    report.note(f"a message is {size:,} bytes")


def _jinja_floor() -> Callable[[Target], Any]:
    env = ImmutableSandboxedEnvironment(autoescape=False)
    html_env = ImmutableSandboxedEnvironment(autoescape=True)
    subject, text, html = env.from_string(SUBJECT), env.from_string(TEXT), html_env.from_string(HTML)
    campaign = {"id": 7, "title": "May news"}

    def render(target: Target) -> tuple[str, str, str]:
        name = target.name or ""
        variables = {
            **target.attributes,
            "name": name,
            "email": target.email,
            "recipient": RecipientView(name, target.email, "", target.attributes),
            "campaign": campaign,
            "unsubscribe_url": "https://example.com/u/token",
        }
        return subject.render(variables), text.render(variables), html.render(variables)

    return render


def _email_message() -> Callable[[Target], bytes]:
    jinja = _jinja_floor()

    def render(target: Target) -> bytes:
        subject, text, html = jinja(target)
        token = make_token(SECRET, Purpose.UNSUBSCRIBE, target.recipient_id, 7)
        message = EmailMessage()
        message["Date"] = format_datetime(datetime.now(UTC))
        message["From"] = "News <news@example.com>"
        message["To"] = f"{target.name} <{target.email}>"
        message["Subject"] = subject
        message["Message-ID"] = make_msgid(domain="example.com")
        message["List-Unsubscribe"] = f"<https://example.com/u/{token}>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        return message.as_bytes(policy=SMTP)

    return render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--messages", type=int, default=2_000)
    args = parser.parse_args(argv)
    bench_render(Report(), rounds=args.rounds, messages=args.messages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
