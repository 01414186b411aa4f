"""The `outbox` notifier: writes each message as an .eml file (mode 0600) into a folder, for review or another MTA.
A file is named by the message's idempotency key, so a retried delivery overwrites its file rather than adding one."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NamedTuple

from campaign_manager.notifiers import Message, Need, Result, key


class OutboxSettings(NamedTuple):
    """[notifiers.outbox]"""

    path: Annotated[
        Path,
        key("the folder each message is written to, as an .eml file (made if missing)", env="CM_NOTIFIERS_OUTBOX_PATH"),
    ] = Path("outbox")


class OutboxNotifier:
    name = "outbox"
    config_class = OutboxSettings
    needs = Need.EMAIL

    def __init__(self, config: OutboxSettings) -> None:
        self.folder = config.path.expanduser()

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def send_batch(self, messages: Sequence[Message]) -> list[Result]:
        return [self._write(message) for message in messages]

    def _write(self, message: Message) -> Result:
        target = self.folder / f"{message.key}.eml"
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(message.data)
        os.replace(tmp, target)
        return Result.sent(message.message_id)
