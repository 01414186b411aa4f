"""Signing up with double opt-in: `GET/POST /subscribe`, `GET/POST /confirm/{token}`.

The form's answer is the same page whatever became of the address (new, known, forgotten, or a robot's that filled
in the hidden field), so that the form tells nobody who is on the list; only a form to fix (not an address, a list
not offered) or a client over `serve.subscribe_rate` gets another. It takes the same time too: the confirmation
message goes out from a job, never inside the request, and the answer waits until ANSWER_AFTER_S has passed (a new
address costs a recipient, a sign-up and a queued job, ~10-30 ms more than a forgotten one, which costs nothing). The
work is `audience.signups` and `sending.confirmations`'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from campaign_manager import db
from campaign_manager.audience import signups
from campaign_manager.sending import confirmations
from campaign_manager.sending.tokens import BadToken
from campaign_manager.serve.deps import client_of, settings_of, views_of
from campaign_manager.serve.views import mask_address

router = APIRouter(include_in_schema=False)
log = logging.getLogger("campaign_manager.serve")

Field = Annotated[str, Form()]
# The hidden field (CSS moves it out of sight; its label tells a screen reader's user to leave it alone): a person
# leaves it empty, a robot filling in every field does not.
TRAP = "website"
# No answer to the form comes sooner than this after its request: several times what the slowest case takes.
ANSWER_AFTER_S = 0.2


def _page(request: Request, template: str, status: int = 200, **values: object) -> HTMLResponse:
    return HTMLResponse(views_of(request).render(template, **values), status_code=status)


def _problem(request: Request, status: int, title: str, text: str) -> HTMLResponse:
    return _page(request, "signup_problem.html", status, title=title, text=text)


def _form(
    request: Request, *, status: int = 200, values: signups.Form | None = None, problem: str | None = None
) -> HTMLResponse:
    with db.settings_session(settings_of(request), write=False) as session:
        groups = signups.public_groups(session)
    return _page(
        request, "subscribe.html", status, groups=groups, form=values or signups.Form(""), problem=problem, trap=TRAP
    )


@router.get("/subscribe", response_class=HTMLResponse)
def subscribe_form(request: Request) -> HTMLResponse:
    return _form(request)


@router.post("/subscribe", response_class=HTMLResponse)
async def subscribe(
    request: Request, email: Field = "", name: Field = "", group: Field = "", website: Field = ""
) -> HTMLResponse:
    started = time.monotonic()
    form = signups.Form(email=email, name=name, group=group, trap=website)
    page = await run_in_threadpool(_subscribe, request, form)
    # Waited for here, not in the thread: a flood of sign-ups does not hold the threads other pages need.
    await asyncio.sleep(max(0.0, ANSWER_AFTER_S - (time.monotonic() - started)))
    return page


def _subscribe(request: Request, form: signups.Form) -> HTMLResponse:
    settings = settings_of(request)
    if settings.serve.double_opt_in:
        missing = confirmations.missing_setting(settings)
        if missing is not None:
            log.warning("sign-up refused: sign-up is not configured: %s", missing)
            text = "Sign-up is not configured yet. Please try later."
            return _problem(request, 503, "Sign-up is not available", text)
    outcome = confirmations.submit_signup(settings, form, client_ip=client_of(request))
    if outcome.answer == signups.Answer.INVALID:
        return _form(request, status=400, values=form, problem=outcome.problem)
    if outcome.answer == signups.Answer.RATE_LIMITED:
        text = "Too many sign-ups came from your network lately. Please try later."
        return _problem(request, 429, "Too many sign-ups", text)
    return _page(request, "subscribed.html", confirm=settings.serve.double_opt_in)


def _bad_link(request: Request) -> HTMLResponse:
    return _problem(
        request,
        400,
        "This link does not work",
        "The link is not valid or has expired. You can sign up again to get a new one.",
    )


@router.get("/confirm/{token}", response_class=HTMLResponse)
def confirm_page(request: Request, token: str) -> HTMLResponse:
    """The confirmation link: a page with a button (a mail scanner that follows links confirms nothing)."""
    settings = settings_of(request)
    try:
        with db.settings_session(settings) as session:
            signup, recipient = confirmations.open_link(session, settings, token)
            group = signups.group_name(session, signup)
            done = signup.confirmed_at is not None
    except BadToken:
        return _bad_link(request)
    if done:
        return _page(request, "confirmed.html", group=group)
    return _page(request, "confirm.html", address=mask_address(recipient.email), group=group)


@router.post("/confirm/{token}", response_class=HTMLResponse)
def confirm(request: Request, token: str) -> HTMLResponse:
    settings = settings_of(request)
    try:
        with db.settings_session(settings) as session:
            signup, recipient = confirmations.open_link(session, settings, token)
            signups.confirm(session, signup, recipient, client_ip=client_of(request))
            group = signups.group_name(session, signup)
    except BadToken:
        return _bad_link(request)
    return _page(request, "confirmed.html", group=group)
