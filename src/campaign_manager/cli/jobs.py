"""`cm jobs ...`: the background jobs (imports, sends) and what became of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from campaign_manager.cli._common import JsonOption, emit, info, print_record, print_table, state

app = typer.Typer(
    name="jobs",
    help="List, inspect and cancel background jobs.\n\nExample: cm jobs list --status failed",
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
    from campaign_manager.services import jobs

    with state(ctx).session(write=False) as session:
        rows = [jobs.describe_job(job) for job in jobs.list_jobs(session, status=status, limit=limit)]
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
    from campaign_manager.services import imports, jobs

    with state(ctx).session(write=False) as session:
        job = jobs.get_job(session, job_id)
        data = jobs.describe_job(job)
        if rejects or rejects_file is not None:
            if job.kind != imports.KIND:
                from campaign_manager.errors import InvalidInput

                raise InvalidInput(f"job {job_id} is a {job.kind} job; only imports have rejected rows")
            if rejects_file is not None:
                try:
                    with open_private_text(rejects_file, newline="") as out:  # 0600: it holds addresses
                        n = imports.write_rejects_csv(session, job, out)
                except OSError as exc:
                    from campaign_manager.errors import InvalidInput

                    raise InvalidInput(f"cannot write {rejects_file}: {exc.strerror}") from None
                info(ctx, f"wrote {n} rejected rows to {rejects_file}")
            if rejects:
                import csv
                import sys

                writer = csv.writer(sys.stdout, lineterminator="\n")
                writer.writerow(["line", "reason", "row"])
                for reject in imports.list_rejects(session, job_id):
                    writer.writerow([reject.line, reject.reason, reject.raw])
            return
    emit(data, as_json=as_json, render=render_job)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: JobId, as_json: JsonOption = False) -> None:
    """Cancel a job that has not started yet (or is waiting for a retry).

    Example: cm jobs cancel 12
    """
    from campaign_manager.services import jobs

    with state(ctx).session() as session:
        data = jobs.describe_job(jobs.cancel_job(session, job_id))
    info(ctx, f"cancelled job {job_id}")
    if as_json:
        emit(data, as_json=True, render=render_job)


def render_job(data: dict[str, Any]) -> None:
    """A job for a person: its fields, then its progress or counts, one per line."""
    from rich.console import Console
    from rich.markup import escape

    print_record(data, fields=FIELDS)
    console = Console(soft_wrap=True, highlight=False)
    progress = data.get("progress")
    if data["status"] == "running" and progress:
        console.print(f"[bold]progress[/bold]: {_percent(progress)}")
    if data["counts"]:
        console.print("[bold]summary[/bold]:")
        width = max(len(COUNT_LABELS.get(key, key)) for key in data["counts"])
        for key, value in data["counts"].items():
            console.print(f"  {COUNT_LABELS.get(key, key):<{width}}  {value}")
    args = {k: v for k, v in data["args"].items() if k != "layout"}  # an import's CSV layout is noise here
    if args:
        console.print("[bold]arguments[/bold]: " + escape(", ".join(f"{k}={v}" for k, v in args.items())))


def _percent(progress: dict[str, Any]) -> str:
    done, total = int(progress.get("done") or 0), int(progress.get("total") or 0)
    return f"{100 * done // total}% ({done} of {total})" if total else f"{done}"


def _summary(row: dict[str, Any]) -> str:
    if row["counts"]:
        # Only what happened: a table of "updated 0, already_member 0, ..." wraps and hides the point.
        # Short keys, not the labels of `jobs show`: the column stays narrow enough not to wrap mid-figure.
        return ", ".join(f"{key} {value}" for key, value in row["counts"].items() if value) or "nothing"
    if row["status"] == "running" and row["progress"]:
        return _percent(row["progress"])
    return ""
