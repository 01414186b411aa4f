"""`cm campaign send|pause|resume|cancel|retry|stats|deliveries|preview`: the sending side of `cm campaign`
(registered on its app by `cli.campaign`)."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from campaign_manager.cli._common import JsonOption, emit, emit_items, info, print_record, state
from campaign_manager.cli._imports import progress_bar

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.tables.jobs import Job

CampaignRef = Annotated[str, typer.Argument(help="Campaign id", show_default=False)]
DELIVERY_COLUMNS = ("delivery_id", "recipient_id", "email", "status", "attempts", "error", "sent_at")


def send(
    ctx: typer.Context,
    ref: CampaignRef,
    notifier: Annotated[str | None, typer.Option(help="Notifier to send with (default: send.notifier)")] = None,
    at: Annotated[
        str | None, typer.Option(help="Start at this time (ISO 8601; without an offset, this machine's local time)")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="At most this many messages a second (lowers the notifier's)")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Send now, in this process, with a progress bar")] = False,
    new: Annotated[bool, typer.Option("--new", help="Also mail audience members not yet in the ledger")] = False,
    test_to: Annotated[
        str | None, typer.Option("--test-to", help="Send one test copy to this address (the ledger is untouched)")
    ] = None,
    recipient: Annotated[
        str | None, typer.Option("--recipient", help="With --test-to: render for this recipient (id or email)")
    ] = None,
    no_unsubscribe_link: Annotated[
        bool, typer.Option("--no-unsubscribe-link", help="Do not warn when no body uses unsubscribe_url")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Send a campaign: queue it for `cm worker` (or run it here with --wait). Sending again sends nothing new.

    Example: cm campaign send 1 --notifier email --at 2026-12-01T09:00
    """
    from campaign_manager.sending import service
    from campaign_manager.sending.campaigns import get_campaign

    settings = state(ctx).settings
    if test_to is not None:
        _send_test(ctx, ref, test_to, recipient=recipient, notifier=notifier, as_json=as_json)
        return
    when = service.parse_at(at) if at is not None else None
    with state(ctx).session(write=False) as session:
        campaign = get_campaign(session, ref)
        if not no_unsubscribe_link and not service.uses_unsubscribe_link(campaign):
            info(ctx, "warning: neither body uses {{ unsubscribe_url }} (--no-unsubscribe-link silences this)")
    made: list[Any] = []

    def save(session: Session) -> Job:
        queued = service.queue_send(session, settings, ref, notifier=notifier, at=when, rate=rate, new=new)
        made.append(queued)
        if queued.job is None:
            raise _NothingToDo(queued.message)
        return queued.job

    try:
        if wait:
            _wait(ctx, save, as_json=as_json)
            return
        from campaign_manager.jobs.queue import submit_job

        submit_job(settings, save, eta=lambda _session: when if when is not None and made else None)
    except _NothingToDo as nothing:
        info(ctx, str(nothing))
        return
    info(ctx, made[0].message + "; `cm worker` sends it, `cm campaign stats " + str(ref) + "` tells how it goes")
    emit({"job_id": made[0].job.id, "campaign_id": int(ref)}, as_json=as_json, render=lambda d: typer.echo(d["job_id"]))


class _NothingToDo(Exception):
    """The campaign was sent (or is sending): nothing queued, nothing committed."""


def _wait(ctx: typer.Context, save: Any, *, as_json: bool) -> None:
    from campaign_manager.errors import ExitCode, JobFailed
    from campaign_manager.jobs import records, runner
    from campaign_manager.states import JobStatus

    with progress_bar(ctx, "sending") as update:
        attempt, signum = runner.run_now(state(ctx).settings, save, progress=update)
    data = records.describe_job(attempt.job)
    counts = data["counts"]
    if signum:
        cid = counts.get("campaign_id", "")
        info(
            ctx,
            f"interrupted: campaign {cid} paused after {counts.get('sent', 0):,} sent; the results in flight were"
            f" recorded; `cm campaign resume {cid}` goes on",
        )
        raise typer.Exit(ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED)
    if data["status"] != JobStatus.DONE:
        raise JobFailed(f"send job {data['id']} {data['status']}: {data['error']}")
    _show_stats(ctx, counts.get("campaign_id"), as_json=as_json)


def _send_test(
    ctx: typer.Context, ref: str, to: str, *, recipient: str | None, notifier: str | None, as_json: bool
) -> None:
    from campaign_manager.errors import CmError
    from campaign_manager.sending import samples

    with state(ctx).session() as session:
        name, result = samples.send_test(session, state(ctx).settings, ref, to, recipient=recipient, notifier=notifier)
    if result.outcome != "sent":
        raise CmError(f"the test copy was not sent ({result.outcome}): {result.reason}")
    info(ctx, f"sent a test copy of campaign {ref} to {to} through {name}")
    emit({"notifier": name, "provider_id": result.provider_id}, as_json=as_json, render=lambda d: None)


def pause(ctx: typer.Context, ref: CampaignRef) -> None:
    """Pause a scheduled or sending campaign; the results in flight are recorded, nothing more goes out.

    Example: cm campaign pause 1
    """
    from campaign_manager.sending import service

    with state(ctx).session() as session:
        campaign = service.pause(session, ref)
    info(ctx, f"paused campaign {campaign.id}; `cm campaign resume {campaign.id}` goes on")


def resume(ctx: typer.Context, ref: CampaignRef) -> None:
    """Resume a paused campaign where it stopped (the ledger says what was sent).

    Example: cm campaign resume 1
    """
    from campaign_manager.jobs.queue import submit_job
    from campaign_manager.sending import service

    job = submit_job(state(ctx).settings, lambda session: service.resume(session, ref)[1])
    info(ctx, f"resumed campaign {ref} as job {job.id}; `cm worker` sends the rest")


def cancel(ctx: typer.Context, ref: CampaignRef) -> None:
    """Cancel a campaign: nothing more is sent; its pending deliveries are marked skipped (reason `cancelled`).

    Example: cm campaign cancel 1
    """
    from campaign_manager.sending import service

    done = service.cancel(state(ctx).settings.database_url, ref)
    info(ctx, f"cancelled campaign {done['campaign_id']}; {done['skipped']:,} pending deliveries skipped")


def retry(
    ctx: typer.Context,
    ref: CampaignRef,
    include_bounced: Annotated[
        bool, typer.Option("--include-bounced", help="Also retry hard bounces (their bounce is cleared)")
    ] = False,
) -> None:
    """Send the failed deliveries again (hard bounces only with --include-bounced).

    Example: cm campaign retry 1
    """
    from campaign_manager.jobs.queue import submit_job
    from campaign_manager.jobs.records import create_job
    from campaign_manager.sending import service

    cid, again = service.retry(state(ctx).settings.database_url, ref, include_bounced=include_bounced)
    if not again:
        info(ctx, f"campaign {cid} has no failed deliveries to retry")
        return
    job = submit_job(state(ctx).settings, lambda session: create_job(session, service.KIND, {"campaign_id": cid}))
    info(ctx, f"re-queued {again:,} failed deliveries of campaign {cid} as job {job.id}")


def stats(ctx: typer.Context, ref: CampaignRef, as_json: JsonOption = False) -> None:
    """Counts per status, attempts, send rate, hard bounces and the top failure reasons.

    Example: cm campaign stats 1 --json
    """
    _show_stats(ctx, ref, as_json=as_json)


def _show_stats(ctx: typer.Context, ref: Any, *, as_json: bool) -> None:
    from campaign_manager.sending import reports

    with state(ctx).session(write=False) as session:
        data = reports.stats(session, ref)
    emit(data, as_json=as_json, render=_render_stats)


def _render_stats(data: dict[str, Any]) -> None:
    reasons = data.pop("top_reasons")
    print_record(data)
    if reasons:
        typer.echo("top reasons:")
    for item in reasons:
        typer.echo(f"  {item['count']:>8,}  {item['status']}: {item['reason']}")
    total = data["total"]
    if total and sys.stdout.isatty():
        from rich.console import Console

        width = 40
        bar = "".join(
            f"[{colour}]" + "█" * round(width * data[status] / total) + f"[/{colour}]"
            for status, colour in (("sent", "green"), ("pending", "yellow"), ("failed", "red"), ("skipped", "grey50"))
        )
        Console().print(bar + "  sent / pending / failed / skipped")


def deliveries(
    ctx: typer.Context,
    ref: CampaignRef,
    status: Annotated[str | None, typer.Option(help="Only this status: pending, sent, failed or skipped")] = None,
    as_json: JsonOption = False,
) -> None:
    """Who got the campaign and who did not (streamed, a page at a time).

    Example: cm campaign deliveries 1 --status failed
    """
    from campaign_manager.sending import reports

    with state(ctx).session(write=False) as session:
        emit_items(reports.iter_deliveries(session, ref, status=status), as_json=as_json, columns=DELIVERY_COLUMNS)


def preview(
    ctx: typer.Context,
    ref: CampaignRef,
    recipient: Annotated[str | None, typer.Option(help="Render for this recipient (id or email)")] = None,
) -> None:
    """Print the message the campaign would send (to a sample recipient, or the one named).

    Example: cm campaign preview 1 --recipient ada@example.com
    """
    from campaign_manager.sending import samples

    with state(ctx).session() as session:
        message = samples.preview(session, state(ctx).settings, ref, recipient=recipient)
    from email import message_from_bytes, policy

    parsed = message_from_bytes(message.data, policy=policy.default)  # headers decoded (RFC 2047) for reading
    headers = "\n".join(f"{name}: {value}" for name, value in parsed.items() if not name.startswith("Content-"))
    typer.echo(headers + "\n\n" + message.text)
    if message.html is not None:
        typer.echo("\n--- HTML ---\n" + message.html)
