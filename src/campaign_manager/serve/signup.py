"""Signing up with double opt-in: `GET/POST /subscribe`, `GET/POST /confirm/{token}`."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
