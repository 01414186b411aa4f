"""The one-click unsubscribe (RFC 8058) and its pages: `POST /u/{token}`, `GET /u/{token}`, `POST /undo/{token}`."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
