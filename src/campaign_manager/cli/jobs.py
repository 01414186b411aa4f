"""`cm jobs ...`: the background jobs (imports, sends) and what became of them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from campaign_manager.cli._common import JsonOption, emit, escape_controls, info, print_record, print_table, state

app = typer.Typer(
    name="jobs",
    help="List, inspect, cancel, retry and purge background jobs.\n\nExample: cm jobs list --status failed",
    no_args_is_help=True,
)

COLUMNS = ("id", "kind", "status", "attempts", "created_at", "finished_at", "summary", "error")
FIELDS = ("id", "kind", "status", "attempts", "worker", "created_at", "started_at", "finished_at", "error")
JobId = Annotated[int, typer.Argument(help="Job id", show_default=False)]

# How `cm jobs show` names the counts a handler returns; other keys are shown as they are.
COUNT_LABELS = {
    "read": "rows read",
    "created": "created",
    "updated": "updated",
    "added": "added to group",
    "already_member": "already in group",
    "duplicates": "duplicates in file",
    "invalid": "invalid",
    "suppressed": "suppressed",
}


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option("--status", help="Only jobs in this state: queued, running, done, failed, cancelled")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest first")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first.

    Example: cm jobs list --status failed
    """
    from campaign_manager.jobs import records

    with state(ctx).session(write=False) as session:
        rows = [records.describe_job(job) for job in records.list_jobs(session, status=status, limit=limit)]
    table = [{**row, "summary": _summary(row)} for row in rows]
    emit(rows, as_json=as_json, render=lambda _: print_table(table, COLUMNS))


@app.command("show")
def show(
    ctx: typer.Context,
    job_id: JobId,
    rejects: Annotated[
        bool, typer.Option("--rejects", help="Print the rows an import rejected (line, reason, row) as CSV")
    ] = False,
    rejects_file: Annotated[
        Path | None,
        typer.Option("--rejects-file", help="Write the rejected rows, under the file's header, to fix and re-import"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show one job: its state, error and counts; for an import, also the rows it rejected.

    Example: cm jobs show 12 --rejects-file fix-me.csv
    """
    from campaign_manager.files import open_private_text
    from campaign_manager.imports import service as imports
    from campaign_manager.jobs import records

    with state(ctx).session(write=False) as session:
        if rejects_file is not None:
            try:
                with open_private_text(rejects_file, newline="") as out:  # 0600: it holds addresses
                    written, cut = imports.write_rejects_file(session, job_id, out)
            except OSError as exc:
                from campaign_manager.errors import InvalidInput

                raise InvalidInput(f"cannot write {rejects_file}: {exc.strerror}") from None
            left_out = f" ({cut} too long to keep whole are left out: see --rejects)" if cut else ""
            info(ctx, f"wrote {written} rejected rows to {rejects_file}{left_out}")
        if rejects:
            imports.write_rejects(session, job_id, sys.stdout)
        if rejects or rejects_file is not None:
            return
        data = records.describe_job(records.get_job(session, job_id))
    emit(data, as_json=as_json, render=render_job)


@app.command("retry")
def retry(
    ctx: typer.Context,
    job_id: JobId,
    wait: Annotated[bool, typer.Option("--wait", help="Run it now, in this process, with a progress bar")] = False,
    as_json: JsonOption = False,
) -> None:
    """Run a failed or cancelled job again; an import goes on after the part it had committed.

    Example: cm jobs retry 12 --wait
    """
    from campaign_manager.jobs import records

    if wait:
        from campaign_manager.cli._imports import wait_import

        emit(wait_import(ctx, lambda session: records.retry_job(session, job_id)), as_json=as_json, render=render_job)
        return
    from campaign_manager.jobs.queue import submit_job

    job = submit_job(state(ctx).settings, lambda session: records.retry_job(session, job_id))
    info(ctx, f"queued job {job_id} again; `cm worker --drain` runs it")
    if as_json:
        emit(records.describe_job(job), as_json=True, render=render_job)


@app.command("purge")
def purge(
    ctx: typer.Context,
    older_than: Annotated[
        float | None,
        typer.Option("--older-than", min=0, help="Days since the job ended (default: jobs.keep_files_days)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Delete the staged uploads of jobs that ended (done, failed or cancelled) more than DAYS ago.

    Workers and drains do this by themselves at most hourly, after jobs.keep_files_days; a purged job cannot be
    retried.

    Example: cm jobs purge --older-than 0
    """
    from campaign_manager.jobs import retention

    st = state(ctx)
    days = st.settings.jobs.keep_files_days if older_than is None else older_than
    with st.session() as session:
        purged = retention.purge_files(session, older_than_days=days)
    info(ctx, f"purged the staged uploads of {len(purged)} job(s)" + (f": {purged}" if purged else ""))
    if as_json:
        emit({"purged": purged}, as_json=True, render=print_record)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: JobId, as_json: JsonOption = False) -> None:
    """Cancel a job that has not started yet (or is waiting for a retry).

    Example: cm jobs cancel 12
    """
    from campaign_manager.jobs import records

    with state(ctx).session() as session:
        data = records.describe_job(records.cancel_job(session, job_id))
    info(ctx, f"cancelled job {job_id}")
    if as_json:
        emit(data, as_json=True, render=render_job)


def render_job(data: dict[str, Any]) -> None:
    """A job for a person: its fields, then its progress or counts, one per line."""
    from rich.console import Console
    from rich.markup import escape

    print_record(data, fields=FIELDS)
    console = Console(soft_wrap=True, highlight=False)
    from campaign_manager.states import JobStatus

    progress = data.get("progress")
    if data["status"] == JobStatus.RUNNING and progress:
        console.print(f"[bold]progress[/bold]: {_percent(progress)}")
    if data["counts"]:
        console.print("[bold]summary[/bold]:")
        width = max(len(COUNT_LABELS.get(key, key)) for key in data["counts"])
        for key, value in data["counts"].items():
            console.print(escape(escape_controls(f"  {COUNT_LABELS.get(key, key):<{width}}  {value}")))
    args = {k: v for k, v in data["args"].items() if k != "layout"}  # an import's CSV layout is noise here
    if args:
        shown = escape_controls(", ".join(f"{k}={v}" for k, v in args.items()))
        console.print("[bold]arguments[/bold]: " + escape(shown))


def _percent(progress: dict[str, Any]) -> str:
    done, total = int(progress.get("done") or 0), int(progress.get("total") or 0)
    return f"{100 * done // total}% ({done} of {total})" if total else f"{done}"


def _summary(row: dict[str, Any]) -> str:
    from campaign_manager.states import JobStatus

    if row["counts"]:
        # Only what happened: a table of "updated 0, already_member 0, ..." wraps and hides the point.
        # Short keys, not the labels of `jobs show`: the column stays narrow enough not to wrap mid-figure.
        return ", ".join(f"{key} {value}" for key, value in row["counts"].items() if value) or "nothing"
    if row["status"] == JobStatus.RUNNING and row["progress"]:
        return _percent(row["progress"])
    return ""
