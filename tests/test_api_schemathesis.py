"""Property-based tests of the REST API from its own OpenAPI document (schemathesis): for every operation, requests
generated from the schema, authenticated, sent to the application in-process over a real database (SQLite and
PostgreSQL), never get a server error, and every answer (errors included) matches the schema declared for its
status. A few rows are made first, so that generated ids sometimes hit something."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from campaign_manager import api
from campaign_manager.serve.app import create_app
from campaign_manager.serve.rest import ROUTERS

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS: list[Callable[..., Any]] = [not_a_server_error, response_schema_conformance]
# Every operation of the API, one test each (read from the router: no settings or database needed to list them).
OPERATIONS = sorted(
    (method, route.path)
    for each in ROUTERS
    for route in each.routes
    if isinstance(route, APIRoute)
    for method in route.methods
)


def fuzzed_app(url: str) -> Any:
    """The application over `url`, with a group, recipients (one opted out) and a campaign in it."""
    with api.open_session(url) as session:
        api.create_group(session, "news")
        for i in range(3):
            api.create_recipient(session, f"p{i}@example.com", groups=["news"])
        api.opt_out_address(session, "out@example.com", reason="test", source="test")
        api.create_campaign(session, title="T", subject="S", text="Hi", groups=["news"])
    return create_app(api.load_settings(None, {"database.url": url, "serve.api_token": TOKEN}))


def test_every_operation_is_fuzzed() -> None:
    assert len(OPERATIONS) >= 23 and ("POST", "/imports") in OPERATIONS


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_api_keeps_its_schema_and_never_fails(db_url: str, method: str, path: str) -> None:
    with warnings.catch_warnings():  # starlette's test client (schemathesis's ASGI transport) asks for httpx2
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app(db_url))
    operation = schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=20,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.call_and_validate(headers=AUTH, checks=CHECKS)

    run()
