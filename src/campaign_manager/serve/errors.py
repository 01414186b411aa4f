"""cm's errors as HTTP answers: the CLI's exit code decides the status, and the body is `{"detail": message, "code":
name}`, where `code` names the exit code (`invalid_input`, `not_found`, `conflict`, `consent`, ...). An exit code
not listed in STATUS (a generic error, a bug) is a 500."""

from __future__ import annotations

from typing import Any

from campaign_manager.errors import CmError, ExitCode

STATUS: dict[ExitCode, int] = {
    ExitCode.INVALID_INPUT: 400,  # well-formed, but refused by the services (body validation is 422)
    ExitCode.NOT_FOUND: 404,
    ExitCode.CONFLICT: 409,
    ExitCode.CONSENT: 409,
    ExitCode.DATABASE: 503,
    ExitCode.QUEUE: 503,
    ExitCode.CONFIG: 503,  # not configured (no notifier to send with, no From): the server's to fix, not the client's
}


def status_of(error: CmError) -> int:
    return STATUS.get(error.exit_code, 500)


def body_of(error: CmError) -> dict[str, Any]:
    detail = error.message if error.hint is None else f"{error.message} ({error.hint})"
    return {"detail": detail, "code": error.exit_code.name.lower()}


def problem(detail: str, code: str) -> dict[str, Any]:
    return {"detail": detail, "code": code}
