"""What every route of the API has: the bearer token (`serve.api_token`, `CM_API_TOKEN`), checked before anything
else of a request is read (a request without it learns nothing, not even whether its body would have been valid),
and the token routes (`api_router`); their sessions are `deps.Db` and `deps.Reader`."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from campaign_manager.serve.deps import settings_of
from campaign_manager.serve.errors import problem

# Declares the scheme in the OpenAPI document (Swagger UI's "Authorize" button); the check itself is TokenRoute's.
bearer = HTTPBearer(auto_error=False, description="`serve.api_token` (or the CM_API_TOKEN variable)")


def refusal(request: Request) -> Response | None:
    """The 401 a request gets without the right `Authorization: Bearer TOKEN`, or None when it has it. The
    comparison takes the same time wherever the given token first differs (hmac.compare_digest)."""
    token = settings_of(request).serve.api_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return _unauthorized("a bearer token is needed: Authorization: Bearer TOKEN", 'Bearer realm="cm"')
    if not token or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return _unauthorized("wrong bearer token", 'Bearer realm="cm", error="invalid_token"')
    return None


def _unauthorized(detail: str, challenge: str) -> Response:
    return JSONResponse(problem(detail, "unauthorized"), status_code=401, headers={"WWW-Authenticate": challenge})


class TokenRoute(APIRoute):
    """A route of the API: the token is checked first, then FastAPI reads and validates the request."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            refused = refusal(request)
            return refused if refused is not None else await handler(request)

        return checked


def api_router(**options: Any) -> APIRouter:
    """A router of the API's routes: every one behind the token, and saying so in the OpenAPI document."""
    return APIRouter(
        route_class=TokenRoute,
        dependencies=[Security(bearer)],
        generate_unique_id_function=lambda route: route.name,  # operationIds a client generator can use as names
        **options,
    )
