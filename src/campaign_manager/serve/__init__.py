"""`cm serve`: one small ASGI application over the same services and database as the CLI.

- `app.create_app(settings)` builds it: the public pages (`pages`: one-click unsubscribe, undo, sign-up and its
  confirmation) and, when `serve.api_token` is set, the REST API (`rest`) with its OpenAPI document and docs.
- `errors` maps cm's errors (`CmError`, by exit code) to HTTP statuses and the `{"detail", "code"}` body.
- `clients` finds the client's IP address (X-Forwarded-For only from `serve.trusted_proxies`).
- `views` renders the pages from Jinja2 templates, the operator's folder (`serve.templates`) first.

FastAPI and uvicorn come with the `serve` extra (`pip install 'campaign-manager[serve]'`); nothing else in cm
imports this package.
"""
