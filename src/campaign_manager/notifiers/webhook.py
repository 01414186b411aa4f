"""The `webhook` notifier: POSTs each message as one JSON object to a URL, the way to a gateway cm has no plugin for
(a chat bridge, a mail API, an in-house relay). The body:

    {"key": "3f9c...-42", "to": "ada@example.com", "from": "News <news@example.com>", "subject": "...",
     "text": "...", "html": "..." or null, "message_id": "<...@example.com>", "headers": {"List-Unsubscribe": "..."}}

`key` is the idempotency key, also sent as the `Idempotency-Key` header: the same for every attempt at one delivery,
so the receiver can drop a duplicate. With `secret` set, each request is signed (`X-CM-Timestamp`,
`X-CM-Signature: sha256=...` over `TIMESTAMP.BODY`); with `token`, it carries `Authorization: Bearer TOKEN`. How
the answers become results: `campaign_manager.notifiers.gateway`.

It sends to recipients' email addresses (`needs` is a property of the class, which the sender reads before it
makes one): a gateway that wants phone numbers gets a plugin of its own, as examples/cm-sms-gateway shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple

from campaign_manager.notifiers import Message, Need, Result, key
from campaign_manager.notifiers.gateway import HttpGateway


class WebhookSettings(NamedTuple):
    """[notifiers.webhook]"""

    url: Annotated[
        str | None,
        key(
            "where each message is POSTed as JSON (http:// or https://)",
            env="CM_NOTIFIERS_WEBHOOK_URL",
            example='"https://gateway.example.com/messages"',
        ),
    ] = None
    token: Annotated[
        str | None,
        key("sent as `Authorization: Bearer TOKEN`", env="CM_NOTIFIERS_WEBHOOK_TOKEN", secret=True, example='""'),
    ] = None
    secret: Annotated[
        str | None,
        key(
            "signs each request: X-CM-Signature: sha256=HMAC-SHA256(secret, TIMESTAMP.BODY), with X-CM-Timestamp",
            env="CM_NOTIFIERS_WEBHOOK_SECRET",
            secret=True,
            example='""',
        ),
    ] = None
    timeout: Annotated[
        float, key("seconds to wait to connect, and for each answer", env="CM_NOTIFIERS_WEBHOOK_TIMEOUT")
    ] = 10.0
    rate: Annotated[
        float,
        key("messages per second, all campaigns and workers together; 0: no limit", env="CM_NOTIFIERS_WEBHOOK_RATE"),
    ] = 0.0


class WebhookNotifier:
    name = "webhook"
    config_class = WebhookSettings
    needs = Need.EMAIL

    def __init__(self, config: WebhookSettings) -> None:
        """ConfigError (exit 7) when `url` is missing or not http(s)."""
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self.gateway = HttpGateway(
            config.url, setting="notifiers.webhook.url", timeout=config.timeout, headers=headers, secret=config.secret
        )

    def open(self) -> None:
        self.gateway.open()

    def send_batch(self, messages: Sequence[Message]) -> list[Result]:
        return [self.gateway.post(payload(message), key=message.key) for message in messages]

    def close(self) -> None:
        self.gateway.close()


def payload(message: Message) -> dict[str, Any]:
    """The JSON object POSTed for `message` (see the module's doc)."""
    return {
        "key": message.key,
        "to": message.to,
        "from": message.sender,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "message_id": message.message_id,
        "headers": dict(message.headers),
    }
