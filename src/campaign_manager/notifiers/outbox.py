"""The `outbox` notifier: writes each message as an .eml file into a folder, for review or another MTA."""

from __future__ import annotations

import os
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Annotated, NamedTuple

from campaign_manager.notifiers import Message, key


class OutboxSettings(NamedTuple):
    """[notifiers.outbox]"""

    folder: Annotated[
        Path,
        key(
            "the folder each message is written to, as an .eml file (made if missing)", env="CM_NOTIFIERS_OUTBOX_FOLDER"
        ),
    ] = Path("outbox")


class OutboxNotifier:
    name = "outbox"
    config_class = OutboxSettings

    def __init__(self, config: OutboxSettings) -> None:
        self.folder = config.folder.expanduser()

    def send(self, message: Message) -> str:
        mail = EmailMessage()
        mail["To"] = message.to
        mail["Subject"] = message.subject
        if message.sender:
            mail["From"] = message.sender
        msgid = make_msgid(domain="cm.local")
        mail["Message-ID"] = msgid
        for name, value in message.headers.items():
            mail[name] = value
        mail.set_content(message.text)
        if message.html:
            mail.add_alternative(message.html, subtype="html")
        self.folder.mkdir(parents=True, exist_ok=True)
        # One file per idempotency key: a retried delivery overwrites rather than duplicates.
        stem = message.idempotency_key or msgid.strip("<>").split("@")[0]
        target = self.folder / f"{stem}.eml"
        tmp = target.with_suffix(".eml.tmp")
        tmp.write_bytes(bytes(mail))
        os.replace(tmp, target)
        return msgid
