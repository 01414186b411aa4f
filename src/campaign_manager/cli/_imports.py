"""The CLI side of a CSV import, shared by `group add-recipients --csv` and `campaign create --recipients-csv`:
stage the file, then queue the job (and return its id at once) or, with --wait, run it here with a progress bar."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from campaign_manager.cli._common import emit, info, print_record, state

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.models import Job

Wait = Annotated[bool, typer.Option("--wait", help="Import now, in this process, with a progress bar")]
EmailColumn = Annotated[str | None, typer.Option("--email-column", help="The email column's header")]
Delimiter = Annotated[str | None, typer.Option("--delimiter", help="Field delimiter (default: sniffed)")]
Encoding = Annotated[str | None, typer.Option("--encoding", help="File encoding (default: UTF-8, BOM or not)")]
UpdateExisting = Annotated[
    bool, typer.Option("--update-existing", help="Overwrite stored names/attributes of existing recipients")
]


@contextmanager
def progress_bar(ctx: typer.Context, description: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar on stderr; silent when stderr is not a terminal or with --quiet."""
    if state(ctx).quiet or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def queue_import(ctx: typer.Context, stage: Callable[[Session], Job]) -> Job:
    """Stage the job (and whatever else the command creates) and queue it, all or nothing."""
    from campaign_manager.jobs.queue import submit_job

    job = submit_job(state(ctx).settings, stage)
    info(ctx, f"queued import job {job.id}; `cm worker --drain` runs it, `cm jobs show {job.id}` tells how it went")
    return job


def wait_import(ctx: typer.Context, stage: Callable[[Session], Job]) -> dict[str, Any]:
    """Stage the job and run it here with a progress bar; its description once it ended. Ctrl-C or SIGTERM stops
    it at once: the job is cancelled with what it committed, one line says so, and the command exits 130 or 143.
    A job that failed raises JobFailed after its summary."""
    from campaign_manager.errors import ExitCode
    from campaign_manager.jobs import records, runner
    from campaign_manager.states import JobStatus

    with progress_bar(ctx, "importing") as update:
        attempt, signum = runner.run_now(state(ctx).settings, stage, progress=update)
    data = records.describe_job(attempt.job)
    job_id = data["id"]
    if signum and data["status"] == JobStatus.CANCELLED:
        added = data["counts"].get("added", 0)
        what = f"the {added:,} recipients it added are kept" if data["counts"] else "nothing was applied"
        info(ctx, f"interrupted: import job {job_id} cancelled; {what}; `cm jobs retry {job_id}` imports the rest")
        raise typer.Exit(ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED)
    summarize(ctx, data)
    if data["status"] != JobStatus.DONE:
        from campaign_manager.errors import JobFailed

        raise JobFailed(f"import job {job_id} {data['status']}: {data['error']}")
    return data


def run_import(ctx: typer.Context, stage: Callable[[Session], Job], *, wait: bool, as_json: bool) -> None:
    """`group add-recipients --csv`: with --wait the job as it ended (a record, or JSON); queued, its id."""
    if wait:
        emit(wait_import(ctx, stage), as_json=as_json, render=print_record)
        return
    job_id = queue_import(ctx, stage).id
    if as_json:
        from campaign_manager.states import JobStatus

        emit({"id": job_id, "status": JobStatus.QUEUED}, as_json=True, render=print_record)
    else:
        typer.echo(job_id)


def summarize(ctx: typer.Context, data: dict[str, Any]) -> None:
    counts = data.get("counts") or {}
    if counts:
        info(ctx, ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if counts.get("invalid"):
        info(ctx, f"see the rejected rows with `cm jobs show {data['id']} --rejects`")
