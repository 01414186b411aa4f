"""The public pages that need no token: `/`, a small page saying what this server is."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from campaign_manager.serve.deps import views_of

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    return HTMLResponse(views_of(request).render("index.html", signup="/subscribe"))
