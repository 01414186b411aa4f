"""How long a value may be, in characters, the same on SQLite and PostgreSQL: the one place that says so.

Services check every value a person or a file gives before the database sees it (`check`), and imports turn an
over-long cell into a rejected row (`too_long`); the models declare the same numbers for their columns. PostgreSQL
would refuse an over-long VARCHAR with an error for the whole statement and SQLite would store it silently: checking
here first makes both backends behave alike and keeps one row's problem that row's problem.
"""

from __future__ import annotations

from campaign_manager.errors import InvalidInput

EMAIL = 320  # RFC 5321's 64 + 1 + 255 (email-validator refuses more than 254 anyway)
NAME = 200
PHONE = 50
GROUP_NAME = 200
DESCRIPTION = 1_000
TITLE = 200
SUBJECT = 998  # RFC 5322's line limit
ATTRIBUTE_KEY = 100
ATTRIBUTE_VALUE = 1_000
REASON = 500  # opt-out, opt-in and other consent reasons

# What each limit is called in messages (and in the README's table).
LABELS: dict[str, int] = {
    "email": EMAIL,
    "name": NAME,
    "phone": PHONE,
    "group name": GROUP_NAME,
    "description": DESCRIPTION,
    "title": TITLE,
    "subject": SUBJECT,
    "attribute key": ATTRIBUTE_KEY,
    "attribute value": ATTRIBUTE_VALUE,
    "reason": REASON,
}


def too_long(what: str, value: str | None, limit: int) -> str | None:
    """The reason `value` is refused, or None when it fits."""
    if value is None or len(value) <= limit:
        return None
    return f"{what} is longer than {limit:,} characters ({len(value):,})"


def check(what: str, value: str | None, limit: int) -> str | None:
    """`value` unchanged, or InvalidInput (exit 2) when it is longer than `limit` characters."""
    reason = too_long(what, value, limit)
    if reason is not None:
        raise InvalidInput(reason)
    return value


def check_attributes(attributes: dict[str, str] | None) -> dict[str, str]:
    """Every key and value of a recipient's attributes within its limit."""
    for key, value in (attributes or {}).items():
        check("attribute key", key, ATTRIBUTE_KEY)
        check(f"attribute {key[:40]!r}", value, ATTRIBUTE_VALUE)
    return dict(attributes or {})
