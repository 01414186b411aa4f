"""The `outbox` notifier: writes each message as an .eml file into a folder, for review or another MTA."""

from __future__ import annotations

import os
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from campaign_manager.notifiers import Message


class OutboxNotifier:
    name = "outbox"

    def __init__(self, config: dict[str, Any]) -> None:
        self.folder = Path(config.get("path", "outbox")).expanduser()

    def send(self, message: Message) -> str:
        mail = EmailMessage()
        mail["To"] = message.to
        mail["Subject"] = message.subject
        if message.sender:
            mail["From"] = message.sender
        msgid = make_msgid(domain="cm.local")
        mail["Message-ID"] = msgid
        for key, value in message.headers.items():
            mail[key] = value
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
