"""`/jobs/`: the background jobs (imports and sends) the API queued, or any other: their state, counts and, for an
import, the rows it could not take, through the same services as `cm jobs`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Response

from campaign_manager.imports.service import rejects_page
from campaign_manager.jobs.records import describe_job, get_job, jobs_page
from campaign_manager.serve.deps import Reader
from campaign_manager.serve.rest.auth import api_router
from campaign_manager.serve.rest.paging import LINK_HEADER, Page, finish, page_of
from campaign_manager.serve.rest.schemas import MAX_ID, JobOut, RejectOut, errors
from campaign_manager.states import JobStatus

router = api_router(prefix="/jobs", tags=["jobs"])
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]
Paged = Annotated[Page, Depends(page_of)]


@router.get("/", response_model=list[JobOut], responses={200: {"headers": LINK_HEADER}, **errors()})
def list_jobs(
    request: Request,
    response: Response,
    page: Paged,
    session: Reader,
    status: Annotated[JobStatus | None, Query(description="Only the jobs in this state")] = None,
) -> list[dict[str, Any]]:
    """Jobs, oldest first, a page at a time."""
    rows = [describe_job(job) for job in jobs_page(session, status=status, after=page.after, limit=page.rows)]
    return finish(request, response, rows, page, lambda row: int(row["id"]))


@router.get("/{job_id}", response_model=JobOut, responses=errors(404))
def show_job(job_id: JobId, session: Reader) -> dict[str, Any]:
    """One job: its state, progress while it runs, its counts once it ended (an import's `invalid` rows: see
    /jobs/{job_id}/rejects), its error if it failed."""
    return describe_job(get_job(session, job_id))


@router.get(
    "/{job_id}/rejects",
    response_model=list[RejectOut],
    responses={200: {"headers": LINK_HEADER}, **errors(400, 404)},
)
def job_rejects(
    request: Request, response: Response, job_id: JobId, page: Paged, session: Reader
) -> list[dict[str, Any]]:
    """The rows an import job could not take, in file order, a page at a time (`after`: a line number). Cells are
    as the file had them: not neutralised for spreadsheets (`cm jobs show ID --rejects-file` writes a file to fix)."""
    rows = [
        {"line": r.line, "reason": r.reason, "row": r.raw}
        for r in rejects_page(session, job_id, after=page.after, limit=page.rows)
    ]
    return finish(request, response, rows, page, lambda row: int(row["line"]))
