"""The REST API: the seed system's paths and bodies, and what cm has beyond them. Every route needs the bearer token
(`serve.api_token`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
