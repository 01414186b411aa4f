"""Alembic environment: cm passes its own connection, so migrations run in the caller's transaction."""

from alembic import context
from sqlmodel import SQLModel

import campaign_manager.models  # noqa: F401  (registers the tables on SQLModel.metadata)


def _include(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    # Huey's tables share a PostgreSQL database with ours but are not ours to migrate.
    return not (type_ == "table" and name is not None and name.startswith("huey"))


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=True,
    include_object=_include,
)
with context.begin_transaction():
    context.run_migrations()
