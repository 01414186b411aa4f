"""`/campaigns/`: create (its `recipient_emails` imported by a queued job), list, show, send (queued), and what
the ledger says (stats, deliveries), through the same services as `cm campaign`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Response
from sqlmodel import Session

from campaign_manager.db import settings_session
from campaign_manager.imports.service import stage_addresses
from campaign_manager.jobs.queue import submit_job
from campaign_manager.jobs.records import describe_job
from campaign_manager.sending import campaigns, reports, service
from campaign_manager.serve.deps import Reader, settings_of
from campaign_manager.serve.rest.auth import api_router
from campaign_manager.serve.rest.paging import LINK_HEADER, Page, finish, page_of
from campaign_manager.serve.rest.schemas import (
    MAX_ID,
    CampaignCreated,
    CampaignDetail,
    CampaignIn,
    CampaignOut,
    DeliveryOut,
    SendIn,
    SendOut,
    StatsOut,
    errors,
)
from campaign_manager.states import DeliveryStatus
from campaign_manager.tables.jobs import Job
from campaign_manager.tables.sending import Campaign

router = api_router(prefix="/campaigns", tags=["campaigns"])
CampaignId = Annotated[int, Path(ge=1, le=MAX_ID)]
Paged = Annotated[Page, Depends(page_of)]
IMPORT_NAME = "POST /campaigns/ recipient_emails"  # what the import job says it read


@router.post(
    "/",
    status_code=201,
    response_model=CampaignCreated,
    responses={
        202: {"model": CampaignCreated, "description": "Created; its `recipient_emails` are imported by `job`"},
        **errors(400, 404, 409),
    },
)
def create_campaign(request: Request, response: Response, body: CampaignIn) -> dict[str, Any]:
    """Create a draft campaign: `message` is its text (a template), the subject its title unless given. With
    `recipient_emails` it is 202: the campaign exists, and a queued import job (`job`) adds the addresses to its
    audience as `cm campaign create --recipients-csv` does (new ones created; opted-out and forgotten ones left
    out and counted), so a campaign of 10,000 addresses is created in one short transaction."""
    settings = settings_of(request)
    made: list[int] = []

    def make(session: Session) -> Campaign:
        campaign = campaigns.create_campaign(
            session,
            title=body.title,
            subject=body.subject or body.title,
            text=body.message,
            html=body.html,
            from_address=body.from_,
            groups=[str(g) for g in dict.fromkeys(body.group_ids)],
        )
        made.append(int(campaign.id or 0))
        return campaign

    def stage(session: Session) -> Job:
        return stage_addresses(session, body.recipient_emails, IMPORT_NAME, campaign_id=int(make(session).id or 0))

    job = None
    if body.recipient_emails:
        job = submit_job(settings, stage)
        response.status_code = 202
    else:
        with settings_session(settings) as session:
            make(session)
    with settings_session(settings, write=False) as session:
        data = campaigns.describe_campaigns(session, [campaigns.get_campaign(session, made[0])])[0]
    return {**data, "job": None if job is None else describe_job(job)}


@router.get("/", response_model=list[CampaignOut], responses={200: {"headers": LINK_HEADER}, **errors()})
def list_campaigns(request: Request, response: Response, page: Paged, session: Reader) -> list[dict[str, Any]]:
    """Every campaign, by id, a page at a time, with its status and audience."""
    rows = campaigns.campaigns_page(session, after=page.after, limit=page.rows)
    return finish(request, response, rows, page, lambda row: int(row["id"]))


class _NothingToDo(Exception):
    """The campaign was sent (or is sending): nothing queued, nothing committed."""


@router.post(
    "/send",
    status_code=202,
    response_model=SendOut,
    responses={200: {"model": SendOut, "description": "Nothing to send: it was sent already"}, **errors(400, 404, 409)},
)
def send_campaign(request: Request, response: Response, body: SendIn) -> dict[str, Any]:
    """Queue a campaign's send (202 with the job; `cm worker` sends it), as `cm campaign send` does: with the
    notifier named, else `send.notifier` (neither: 503 `config`), now or `at` a later time, at most `rate`
    messages a second. A campaign sent already answers 200 with no job (`new: true` mails who joined since)."""
    settings = settings_of(request)
    at = body.at
    made: list[service.Queued] = []
    warning = ""

    def save(session: Session) -> Job:
        nonlocal warning
        queued = service.queue_send(
            session, settings, body.campaign_id, notifier=body.notifier, at=at, rate=body.rate, new=body.new
        )
        made.append(queued)
        if queued.job is None:
            raise _NothingToDo(queued.message)
        if not service.uses_unsubscribe_link(campaigns.get_campaign(session, body.campaign_id)):
            warning = "; warning: neither body uses {{ unsubscribe_url }}"
        return queued.job

    try:
        job = submit_job(settings, save, eta=lambda _session: at)
    except _NothingToDo as nothing:
        response.status_code = 200
        return {"campaign_id": body.campaign_id, "job": None, "message": str(nothing)}
    response.headers["Location"] = f"/jobs/{job.id}"
    return {"campaign_id": body.campaign_id, "job": describe_job(job), "message": made[0].message + warning}


@router.get("/{campaign_id}", response_model=CampaignDetail, responses=errors(404))
def show_campaign(campaign_id: CampaignId, session: Reader) -> dict[str, Any]:
    """One campaign, with its bodies and its audience."""
    return campaigns.describe_campaigns(session, [campaigns.get_campaign(session, campaign_id)], full=True)[0]


@router.get("/{campaign_id}/stats", response_model=StatsOut, responses=errors(404))
def campaign_stats(campaign_id: CampaignId, session: Reader) -> dict[str, Any]:
    """Counts per delivery status, attempts, the send rate, hard bounces, the top failure reasons."""
    return reports.stats(session, campaign_id)


@router.get(
    "/{campaign_id}/deliveries",
    response_model=list[DeliveryOut],
    responses={200: {"headers": LINK_HEADER}, **errors(404)},
)
def campaign_deliveries(
    request: Request,
    response: Response,
    campaign_id: CampaignId,
    page: Paged,
    session: Reader,
    status: Annotated[DeliveryStatus | None, Query(description="Only the deliveries in this state")] = None,
) -> list[dict[str, Any]]:
    """Who got it and who did not, by delivery id, a page at a time (a forgotten person's row has no address)."""
    rows = reports.deliveries_page(session, campaign_id, status=status, after=page.after, limit=page.rows)
    return finish(request, response, rows, page, lambda row: int(row["delivery_id"]))
