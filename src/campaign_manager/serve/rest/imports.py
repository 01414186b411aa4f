"""`POST /imports`: a CSV file uploaded into a group or a campaign's audience, queued as an import job, as
`cm group add-recipients --csv` and `cm campaign create --recipients-csv` do."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import File, Form, Request, Response, UploadFile
from sqlmodel import Session

from campaign_manager.imports.service import stage_upload
from campaign_manager.jobs.queue import submit_job
from campaign_manager.jobs.records import describe_job
from campaign_manager.serve.deps import settings_of
from campaign_manager.serve.rest.auth import api_router
from campaign_manager.serve.rest.schemas import MAX_ID, JobOut, errors
from campaign_manager.tables.jobs import Job

router = api_router(tags=["imports"])
UPLOAD_NAME = "upload"  # what the job says it read when the upload has no file name


@router.post("/imports", status_code=202, response_model=JobOut, responses=errors(400, 404, 409))
def import_file(
    request: Request,
    response: Response,
    file: Annotated[UploadFile, File(description="The CSV file (a header row naming the email column)")],
    group: Annotated[str | None, Form(max_length=200, description="The group to import into (id or name)")] = None,
    campaign_id: Annotated[
        int | None, Form(ge=1, le=MAX_ID, description="Or the campaign whose audience it goes into")
    ] = None,
    email_column: Annotated[str | None, Form(max_length=100, description="The email column's header")] = None,
    delimiter: Annotated[str | None, Form(max_length=10, description="Field delimiter (default: sniffed)")] = None,
    encoding: Annotated[str | None, Form(max_length=40, description="Default: UTF-8, BOM or not")] = None,
    update_existing: Annotated[
        bool, Form(description="Overwrite the names and attributes of existing recipients")
    ] = False,
) -> dict[str, Any]:
    """Queue an import of a CSV file (202 with the job; `cm worker` runs it). The file is checked and copied into
    the database first: one that cannot be imported at all (no email column, binary, not valid text in its
    encoding) is a 400 and queues nothing. Each row's problem stays that row's: GET /jobs/{id} counts them, and
    GET /jobs/{id}/rejects lists them."""
    name = file.filename or UPLOAD_NAME

    def stage(session: Session) -> Job:
        return stage_upload(
            session,
            file.file,
            name,
            group=group,
            campaign_id=campaign_id,
            encoding=encoding,
            delimiter=delimiter,
            email_column=email_column,
            update_existing=update_existing,
        )

    job = submit_job(settings_of(request), stage)
    response.headers["Location"] = f"/jobs/{job.id}"
    return describe_job(job)
