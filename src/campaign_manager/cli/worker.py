"""`cm worker`: run queued jobs, for good (a service) or until the queue is empty (`--drain`, for cron)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from campaign_manager.cli._common import info, state

if TYPE_CHECKING:
    from campaign_manager.jobs.drain import DrainReport

app = typer.Typer(name="worker")


@app.command()
def worker(
    ctx: typer.Context,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", min=1, help="Jobs run at once (default: worker.workers)")
    ] = None,
    drain: Annotated[bool, typer.Option("--drain", help="Run every job that is due, then exit")] = False,
    grace: Annotated[
        float, typer.Option("--grace", min=0, help="Seconds running jobs get to finish after SIGTERM")
    ] = 30.0,
) -> None:
    """Run queued jobs: a long-running worker, or with --drain everything that is due, then exit.

    Each job's start and end is logged on stderr (-q: errors only).

    SIGTERM stops taking jobs and gives the running ones --grace seconds to finish; SIGINT (Ctrl-C) does not wait.

    A job still running then goes back to the queue for the next worker.

    --drain exits 0 when every job it ran succeeded, 9 when one did not; retries not yet due are left for later.

    A queue out of reach is waited for (one log line an attempt, up to a minute apart); --drain exits 8. A job whose
    database cannot be written goes back to the queue, its attempt not counted; --drain then exits 6.

    Overlapping drains never run a job twice.

    Example: cm worker --workers 4

    Example: cm -q worker --drain
    """
    from campaign_manager.jobs import consumer
    from campaign_manager.jobs import drain as draining
    from campaign_manager.logs import configure_logging

    st = state(ctx)
    settings = st.settings
    configure_logging(verbose=st.verbose, quiet=st.quiet)
    threads = workers or settings.worker.workers
    if not drain:
        consumer.run_worker(settings, workers=threads, grace=grace)
        return
    report = draining.drain(settings, workers=threads, grace=grace)
    for line in summarize(report):
        info(ctx, line)
    if report.database_error is not None:
        raise report.database_error
    if report.queue_error is not None:
        raise report.queue_error
    if not report.ok:
        from campaign_manager.errors import JobFailed

        bad = report.ids(*draining.FAILURES)
        raise JobFailed(f"{len(bad)} job(s) did not succeed: {', '.join(map(str, bad))}", hint="see `cm jobs show ID`")


def summarize(report: DrainReport) -> list[str]:
    """The drain's summary, for a person (stderr)."""
    from campaign_manager.jobs.runner import Outcome
    from campaign_manager.jobs.tasks import TaskOutcome

    counts = {
        label: report.ids(*outcomes)
        for label, outcomes in (
            ("done", (Outcome.DONE,)),
            ("failed", (Outcome.FAILED, TaskOutcome.ERROR)),
            ("waiting for a retry", (Outcome.RETRY,)),
            ("released", (Outcome.RELEASED, Outcome.LOST)),
            ("skipped (cancelled, finished or held by another worker)", (Outcome.SKIPPED,)),
        )
    }
    ran = sum(len(ids) for ids in counts.values())
    parts = [f"{len(ids)} {label}" + (f" ({_ids(ids)})" if label != "done" else "") for label, ids in counts.items()]
    lines = [f"drain: {ran} job(s): " + ", ".join(p for p in parts if not p.startswith("0 "))] if ran else []
    if not ran:
        lines.append("drain: no jobs were due")
    if report.recovered.requeued:
        lines.append(f"recovered from a stopped worker: {_ids(report.recovered.requeued)}")
    if report.recovered.orphaned:
        lines.append(f"queued again, their message was lost: {_ids(report.recovered.orphaned)}")
    if report.recovered.failed:
        lines.append(f"given up after their worker stopped too often: {_ids(report.recovered.failed)}")
    if report.waiting:
        etas = [eta for _, eta in report.waiting if eta is not None]
        when = f"; the next is due at {min(etas):%Y-%m-%d %H:%M:%S} UTC" if etas else ""
        ids = sorted(job_id for job_id, _ in report.waiting)
        lines.append(f"{len(ids)} retry(ies) not yet due, left for a later run: {_ids(ids)}{when}")
    return lines


def _ids(ids: list[int]) -> str:
    shown = ", ".join(f"job {i}" for i in ids[:10])
    return shown + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
