"""Opening the files a user names, with one clear error for each way it can go wrong."""

from __future__ import annotations

from pathlib import Path
from typing import IO

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
