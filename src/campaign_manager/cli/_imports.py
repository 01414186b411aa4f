"""The CLI side of a CSV import, shared by `group add-recipients --csv` and `campaign create --recipients-csv`:
stage the file, then queue the job (and return its id at once) or, with --wait, run it here with a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from campaign_manager.cli._common import emit, info, print_record, state

if TYPE_CHECKING:
    from sqlmodel import Session

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
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def run_import(
    ctx: typer.Context,
    stage: Callable[[Session], Any],
    *,
    wait: bool,
    as_json: bool,
) -> None:
    """`stage(session)` stages the job (and whatever else the command creates) and returns it."""
    from campaign_manager.models import Job
    from campaign_manager.services import jobs

    st = state(ctx)
    url = st.settings.database_url
    with st.session() as session:
        job_id = int(stage(session).id)
    if wait:
        with progress_bar(ctx, f"importing (job {job_id})") as update:
            job = jobs.run_job(url, job_id, worker="cm --wait", progress=update)
        with st.session(write=False) as session:
            data = jobs.describe_job(session.get(Job, job_id) or job)
        summarize(ctx, data)
        emit(data, as_json=as_json, render=print_record)
        if data["status"] != "done":
            from campaign_manager.errors import JobFailed

            raise JobFailed(f"import job {job_id} failed: {data['error']}")
        return
    from campaign_manager.queue import enqueue_job

    enqueue_job(st.settings, job_id)
    info(ctx, f"queued import job {job_id}; `cm worker --drain` runs it, `cm jobs show {job_id}` tells how it went")
    if as_json:
        emit({"id": job_id, "status": "queued"}, as_json=True, render=print_record)
    else:
        typer.echo(job_id)


def summarize(ctx: typer.Context, data: dict[str, Any]) -> None:
    counts = data.get("counts") or {}
    if counts:
        info(ctx, ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if counts.get("invalid"):
        info(ctx, f"see the rejected rows with `cm jobs show {data['id']} --rejects`")
