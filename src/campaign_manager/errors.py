"""Errors a person can act on. The CLI prints `message` (and `hint`) on one line and exits with `exit_code`."""

from __future__ import annotations


class CmError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInput(CmError):
    """Bad input: an invalid email, a malformed option value, an unreadable or unusable file."""

    exit_code = 2


class NotFound(CmError):
    exit_code = 3


class Conflict(CmError):
    """The change would break a uniqueness rule (a duplicate group name, say)."""

    exit_code = 4


class ConsentError(CmError):
    """The change would mail or reactivate someone who opted out or was forgotten."""

    exit_code = 5


class DatabaseError(CmError):
    """The database cannot be reached, or its schema does not match this version of cm."""

    exit_code = 6


class ConfigError(CmError):
    exit_code = 7


class QueueError(CmError):
    exit_code = 8


class JobFailed(CmError):
    """A job ran and failed; its row says why."""

    exit_code = 9
