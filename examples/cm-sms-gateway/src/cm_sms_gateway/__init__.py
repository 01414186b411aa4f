"""cm-sms-gateway: a cm notifier that sends each message's text as an SMS through an HTTP gateway.

An example of a third-party plugin: cm's README shows this module's code (a test keeps the two equal) and
cm's test suite installs this package and sends through it to a local HTTP server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, NamedTuple

from campaign_manager.notifiers import Message, Need, Result, key
from campaign_manager.notifiers.gateway import HttpGateway


class SmsSettings(NamedTuple):  # or a frozen dataclass
    """[notifiers.sms]: one field a key; its type is checked (str, int, float, bool or Path, or `... | None`)."""

    url: Annotated[str | None, key("the gateway's URL for new messages", env="CM_NOTIFIERS_SMS_URL")] = None
    api_key: Annotated[str | None, key("the gateway's API key", env="CM_NOTIFIERS_SMS_API_KEY", secret=True)] = None
    sender_id: Annotated[str | None, key("the sender shown on phones", env="CM_NOTIFIERS_SMS_SENDER_ID")] = None
    timeout: Annotated[float, key("seconds to wait for the gateway", env="CM_NOTIFIERS_SMS_TIMEOUT")] = 10.0


class SmsNotifier:
    name = "sms"  # its entry point's name
    config_class = SmsSettings
    needs = Need.PHONE  # a recipient without a phone number is skipped (reason `no phone`)

    def __init__(self, config: SmsSettings) -> None:
        # `config`: the declared defaults, then the file's [notifiers.sms] table, then the environment.
        # HttpGateway raises ConfigError (exit 7) when the URL is missing or not http(s).
        auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.gateway = HttpGateway(config.url, setting="notifiers.sms.url", timeout=config.timeout, headers=auth)
        self.sender_id = config.sender_id

    def open(self) -> None:
        """Optional. Connects, raising NotifierDown if the gateway is down, before any message is tried."""
        self.gateway.open()

    def send_batch(self, messages: Sequence[Message]) -> list[Result]:
        """One Result per message, in order: a plain function, which cm runs in a thread (it may also be a
        coroutine). HttpGateway.post gives Result.sent(the answer's "id"), Result.retry(reason) for 408, 429, 5xx
        and timeouts, Result.failed(reason) for other 4xx, and raises NotifierDown when the gateway itself is
        unreachable or refuses the key: then no attempt is counted and the whole send backs off."""
        results = []
        for message in messages:
            body = {"to": message.to, "text": message.text, "reference": message.key}
            if self.sender_id:
                body["from"] = self.sender_id
            results.append(self.gateway.post(body, key=message.key))  # key: sent as the Idempotency-Key header
        return results

    def close(self) -> None:
        """Optional."""
        self.gateway.close()
