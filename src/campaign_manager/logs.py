"""Log lines on stderr: text for people, or one JSON object a line (`log.format = "json"`) for collectors."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime


def setup_logging(level_name: str | None, log_format: str | None, *, verbose: bool, quiet: bool) -> None:
    level_name = level_name or os.environ.get("CM_LOG_LEVEL", "warning")
    level = getattr(logging, level_name.upper(), logging.WARNING)
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    if (log_format or os.environ.get("CM_LOG_FORMAT", "text")) == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("campaign_manager")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


def configure_logging(*, verbose: bool, quiet: bool) -> None:
    """Job start/end lines at INFO unless --quiet; Huey's own warnings through the same handler as ours."""
    ours = logging.getLogger("campaign_manager")
    logging.getLogger("campaign_manager.worker").setLevel(
        logging.NOTSET if quiet or ours.getEffectiveLevel() <= logging.INFO else logging.INFO
    )
    theirs = logging.getLogger("huey")
    theirs.handlers[:] = ours.handlers
    theirs.propagate = False
    theirs.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
