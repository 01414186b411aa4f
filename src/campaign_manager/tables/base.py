"""What every table shares: ids are integers that never change or get reused; natural keys (email, group name) are
unique; times are stored in UTC (`UtcDateTime`). Emails are stored as email-validator normalizes them, and compared
through `email_key` (the normalized address lowercased), so two spellings that differ only in case are one
recipient. The states a status column holds are the enums of `states` (the columns are plain strings).

The tables live in modules by domain (`audience`, `sending`, `jobs`), so that a command loads only the ones it
uses: building a SQLModel table class is most of what importing them costs. `campaign_manager.models` gathers them
all (for migrations)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite would hand back naive ones)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def created() -> Any:
    return Field(default_factory=utcnow, sa_type=UtcDateTime, nullable=False)


def fk(
    target: str, *, ondelete: str = "CASCADE", primary_key: bool = False, nullable: bool = False, index: bool = False
) -> Any:
    return Field(  # type: ignore[call-overload]  # sqlmodel types ondelete as a Literal
        default=None, foreign_key=target, ondelete=ondelete, primary_key=primary_key, nullable=nullable, index=index
    )


class TableModel(SQLModel):
    """The base of every table. Pydantic builds a model's validators when they are first needed rather than when the
    class is made: a table's instances are made without validation (SQLModel's way) and cm never validates one, while
    building them for every table took about half of this module's import time, on every command."""

    model_config = SQLModel.model_config | {"defer_build": True}
