"""Opening the files a user names, with one clear error for each way it can go wrong; creating cm's own files
and folders readable by their owner only."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, TextIO

from campaign_manager.errors import InvalidInput


def open_input(path: str | Path, what: str = "file") -> IO[bytes]:
    """Open a file for reading; InvalidInput (naming `what`) if it is missing, a folder or unreadable."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise InvalidInput(f"{what} {path} is a folder, not a file")
        return path.open("rb")
    except FileNotFoundError:
        raise InvalidInput(f"{what} not found: {path}") from None
    except PermissionError:
        raise InvalidInput(f"cannot read {what} {path}: permission denied") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror}") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A whole UTF-8 text file."""
    with open_input(path, what) as stream:
        data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} {path} is not UTF-8 text") from None


# Files and folders cm creates hold addresses (databases, queues, rejected rows) or passwords (campaign.toml): they
# are made readable by their owner only, whatever the umask. A file that already exists keeps the mode it has.
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def create_private_dir(path: Path) -> None:
    """Make the folder `path` (0700) and any missing parents (with the usual mode); nothing if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=PRIVATE_DIR, exist_ok=True)


def create_private(path: str | Path) -> None:
    """Create `path` as an empty file (0600) unless it exists; its folder must exist.

    An existing file is never opened: closing any descriptor of a SQLite file drops every POSIX lock the process
    holds on it, those of its other connections too (SQLite's own warning), which corrupts what they write."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))


def open_private_text(path: str | Path, *, encoding: str = "utf-8", newline: str | None = None) -> TextIO:
    """Open `path` to write text into, truncated; a new file is made 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    return open(fd, "w", encoding=encoding, newline=newline)
