"""The ASGI application of `cm serve` (uvicorn runs it; tests call it in-process or as a real `cm serve`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from campaign_manager import __version__
from campaign_manager.errors import CmError
from campaign_manager.serve import errors
from campaign_manager.serve.clients import trusted_networks
from campaign_manager.serve.views import Views

if TYPE_CHECKING:
    from campaign_manager.config import Settings

DOCS_ASSETS = "/docs-assets"

# On every answer, pages, errors and API alike: a URL may hold a token, and no answer is for a cache, another site or
# a search engine.
PRIVATE_HEADERS = [(b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"), (b"x-robots-tag", b"noindex")]


class PrivateHeaders:
    """Pure ASGI middleware adding PRIVATE_HEADERS where a response has not set them (cheaper per request than
    Starlette's BaseHTTPMiddleware, which runs the app in a task of its own)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith(DOCS_ASSETS):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in PRIVATE_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: Settings) -> FastAPI:
    """The application over `settings`' database: the public pages always; the REST API, `/openapi.json` and
    `/docs` only when `serve.api_token` is set."""
    from campaign_manager.serve import pages, signup, unsubscribe

    api_on = bool(settings.serve.api_token)
    app = FastAPI(
        title="cm",
        version=__version__,
        summary="Campaign Manager's REST API: recipients, groups, campaigns, sends and jobs.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if api_on else None,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.views = Views(settings)
    app.state.trusted = trusted_networks(settings.serve.trusted_proxies)
    app.state.sqlite_writers = None  # made when the application starts (_lifespan): it belongs to the event loop
    app.add_exception_handler(CmError, _cm_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_middleware(PrivateHeaders)
    app.include_router(pages.router)
    app.include_router(unsubscribe.router)
    app.include_router(signup.router)
    if api_on:
        from campaign_manager.serve import rest

        app.include_router(rest.router)
        _offline_docs(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The threads that run the routes: `serve.threads`, by default 4 per core, not anyio's 40 (on 2 cores, 40
    threads taking turns at the GIL answered a page of recipients 77 times a second under 50 clients, 8 threads
    110 times: bench/README.md)."""
    import anyio
    import anyio.to_thread

    anyio.to_thread.current_default_thread_limiter().total_tokens = threads(app.state.settings)
    app.state.sqlite_writers = anyio.Semaphore(1)  # serve.deps: this process's SQLite writers take turns
    yield


def threads(settings: Settings) -> int:
    return settings.serve.threads or max(8, 4 * (os.cpu_count() or 1))


async def _cm_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CmError)
    return JSONResponse(errors.body_of(exc), status_code=errors.status_of(exc))


async def _invalid_body(request: Request, exc: Exception) -> JSONResponse:
    """422 with one line: the first problem FastAPI found, and where (`body.email: value is not a valid email`)."""
    assert isinstance(exc, RequestValidationError)
    problems: list[Any] = list(exc.errors())
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = str(first.get("msg", "invalid request")).replace("\n", " ")
    detail = f"{where}: {message}" if where else message
    if len(problems) > 1:
        detail += f" (and {len(problems) - 1} more)"
    return JSONResponse(errors.problem(detail, "invalid_input"), status_code=422)


def _offline_docs(app: FastAPI) -> None:
    """`/docs`: Swagger UI from the files of the swagger-ui-bundle package, served here (no CDN: it works offline)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="cm API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )
