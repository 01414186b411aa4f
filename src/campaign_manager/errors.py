"""Errors a person can act on. The CLI prints `message` (and `hint`) on one line and exits with `exit_code`."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code of `cm`, with what it means (`meaning`: the first words of its row in the README's table,
    which a test compares with this class). Usage errors share 2 with invalid input."""

    meaning: str

    def __new__(cls, code: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member

    OK = 0, "success"
    ERROR = 1, "a generic error"
    INVALID_INPUT = 2, "invalid input"
    NOT_FOUND = 3, "not found"
    CONFLICT = 4, "conflict"
    CONSENT = 5, "consent"
    DATABASE = 6, "database"
    CONFIG = 7, "configuration"
    QUEUE = 8, "queue"
    JOB_FAILED = 9, "job failed"
    INTERNAL = 70, "internal error"  # sysexits' EX_SOFTWARE
    INTERRUPTED = 130, "interrupted"  # 128 + SIGINT, as shells report it
    TERMINATED = 143, "terminated"  # 128 + SIGTERM


class CmError(Exception):
    exit_code = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInput(CmError):
    """Bad input: an invalid email, a malformed option value, an unreadable or unusable file."""

    exit_code = ExitCode.INVALID_INPUT


class NotFound(CmError):
    exit_code = ExitCode.NOT_FOUND


class Conflict(CmError):
    """The change would break a uniqueness rule (a duplicate group name, say)."""

    exit_code = ExitCode.CONFLICT


class ConsentError(CmError):
    """The change would mail or reactivate someone who opted out or was forgotten."""

    exit_code = ExitCode.CONSENT


class DatabaseError(CmError):
    """The database cannot be reached, or its schema does not match this version of cm."""

    exit_code = ExitCode.DATABASE


class ConfigError(CmError):
    """A bad config file, an unknown key, a value of the wrong type."""

    exit_code = ExitCode.CONFIG


class QueueError(CmError):
    exit_code = ExitCode.QUEUE


class JobFailed(CmError):
    """A job ran and failed; its row says why."""

    exit_code = ExitCode.JOB_FAILED
