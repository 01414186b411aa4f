"""`cm campaign ...`: what to send, and to whom."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from campaign_manager.cli import _sending
from campaign_manager.cli._common import JsonOption, emit, emit_items, info, print_record, state
from campaign_manager.cli._imports import (
    Delimiter,
    EmailColumn,
    Encoding,
    UpdateExisting,
    Wait,
    queue_import,
    wait_import,
)
from campaign_manager.errors import InvalidInput
from campaign_manager.files import read_text

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.tables.jobs import Job
    from campaign_manager.tables.sending import Campaign

app = typer.Typer(
    name="campaign",
    help="Create, send and inspect campaigns.\n\nExample: cm campaign send 1 --wait",
    no_args_is_help=True,
)

COLUMNS = ("id", "title", "subject", "status", "audience")


@app.command("create")
def create(
    ctx: typer.Context,
    title: Annotated[str, typer.Option(help="Name for you (not shown to recipients)", show_default=False)],
    subject: Annotated[str, typer.Option(help="Subject line", show_default=False)],
    text: Annotated[str | None, typer.Option(help="Plain-text body")] = None,
    text_file: Annotated[Path | None, typer.Option(help="Read the plain-text body from a file")] = None,
    html_file: Annotated[Path | None, typer.Option(help="Read an HTML body from a file")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="From address")] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="Target group (repeatable)")] = None,
    recipient: Annotated[
        list[str] | None, typer.Option("--recipient", help="Target recipient id or email (repeatable)")
    ] = None,
    recipients_csv: Annotated[
        str | None,
        typer.Option("--recipients-csv", help="Import recipients from a CSV file (- for stdin) as a background job"),
    ] = None,
    wait: Wait = False,
    email_column: EmailColumn = None,
    delimiter: Delimiter = None,
    encoding: Encoding = None,
    update_existing: UpdateExisting = False,
    as_json: JsonOption = False,
) -> None:
    """Create a draft campaign for groups and/or individual recipients.

    With --recipients-csv the file's addresses are imported into the campaign's own audience by a queued job
    (its id is printed; --wait runs it here), exactly as `cm group add-recipients --csv` does for a group.

    Example: cm campaign create --title "May news" --subject "What's new in May" --text-file may.txt --group newsletter
    """
    from campaign_manager.sending import campaigns

    if (text is None) == (text_file is None):
        raise InvalidInput("give exactly one of --text and --text-file")
    body = text if text is not None else read_text(text_file, "--text-file")  # type: ignore[arg-type]
    html = read_text(html_file, "--html-file") if html_file is not None else None

    def make(session: Session) -> Campaign:
        return campaigns.create_campaign(
            session,
            title=title,
            subject=subject,
            text=body,
            html=html,
            from_address=from_,
            groups=group or (),
            recipients=recipient or (),
        )

    if recipients_csv is None:
        with state(ctx).session() as session:
            data = campaigns.describe_campaigns(session, [make(session)])[0]
        emit(data, as_json=as_json, render=print_record)
        return

    from campaign_manager.imports.service import stage_import

    made: list[int] = []

    def stage(session: Session) -> Job:
        campaign = make(session)
        made.append(int(campaign.id or 0))
        return stage_import(
            session,
            recipients_csv,
            campaign_id=campaign.id,
            email_column=email_column,
            delimiter=delimiter,
            encoding=encoding,
            update_existing=update_existing,
        )

    # The campaign is what this command makes: its id on stdout, as without a file; the import job on stderr.
    if wait:
        job = wait_import(ctx, stage)
        extra = {"job_id": job["id"], "import": {"status": job["status"], "counts": job["counts"]}}
    else:
        extra = {"job_id": queue_import(ctx, stage).id}
    info(ctx, f"created campaign {made[0]}")
    with state(ctx).session(write=False) as session:
        data = {**campaigns.describe_campaigns(session, [campaigns.get_campaign(session, made[0])])[0], **extra}
    if as_json:
        emit(data, as_json=True, render=print_record)
    else:
        typer.echo(made[0])


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List campaigns with their audience sizes.

    Example: cm campaign list --json
    """
    from campaign_manager.sending import campaigns

    with state(ctx).session(write=False) as session:
        emit_items(campaigns.iter_campaigns(session), as_json=as_json, columns=COLUMNS)


@app.command("show")
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Campaign id", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Show a campaign, its bodies and its audience (distinct active recipients it would reach).

    Example: cm campaign show 1
    """
    from campaign_manager.sending import campaigns

    with state(ctx).session(write=False) as session:
        data = campaigns.describe_campaigns(session, [campaigns.get_campaign(session, ref)], full=True)[0]
    emit(data, as_json=as_json, render=print_record)


@app.command("update")
def update(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Campaign id", show_default=False)],
    title: Annotated[str | None, typer.Option(help="New title")] = None,
    subject: Annotated[str | None, typer.Option(help="New subject line (a template)")] = None,
    text: Annotated[str | None, typer.Option(help="New plain-text body (a template)")] = None,
    text_file: Annotated[Path | None, typer.Option(help="Read the new plain-text body from a file")] = None,
    html_file: Annotated[Path | None, typer.Option(help="Read a new HTML body from a file")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="New From address")] = None,
    as_json: JsonOption = False,
) -> None:
    """Change a draft campaign (its templates are checked).

    Example: cm campaign update 1 --subject "Hello {{ name }}"
    """
    from campaign_manager.sending import campaigns

    if text is not None and text_file is not None:
        raise InvalidInput("give at most one of --text and --text-file")
    body = read_text(text_file, "--text-file") if text_file is not None else text
    html = read_text(html_file, "--html-file") if html_file is not None else None
    with state(ctx).session() as session:
        campaign = campaigns.update_campaign(
            session, ref, title=title, subject=subject, text=body, html=html, from_address=from_
        )
        data = campaigns.describe_campaigns(session, [campaign])[0]
    emit(data, as_json=as_json, render=print_record)


@app.command("delete")
def delete(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Campaign id", show_default=False)]) -> None:
    """Delete a draft (or cancelled) campaign.

    Example: cm campaign delete 1
    """
    from campaign_manager.sending import campaigns

    with state(ctx).session() as session:
        cid = campaigns.delete_campaign(session, ref)
    info(ctx, f"deleted campaign {cid}")


for _name, _command in (
    ("send", _sending.send),
    ("pause", _sending.pause),
    ("resume", _sending.resume),
    ("cancel", _sending.cancel),
    ("retry", _sending.retry),
    ("stats", _sending.stats),
    ("deliveries", _sending.deliveries),
    ("preview", _sending.preview),
):
    app.command(_name)(_command)
