"""The `email` notifier: SMTP through up to `connections` reused connections, with ESMTP PIPELINING when the
server offers it (see `smtp` for the protocol and what each reply means, `smtp_pool` for the connections).

Settings, [notifiers.email]: `tls = "starttls"` is required STARTTLS: a server that does not offer it gets no
message and no password (NotifierDown). AUTH over `tls = "none"` is refused unless the host is loopback
(127.0.0.0/8, ::1 or `localhost`; a name is not resolved): that is a ConfigError from the constructor, before any
connection, as are a `tls` value other than the three and a missing host. Certificates are checked unless
`verify = false`; `ca_file` adds certificates to trust (a private CA, a self-signed test server).

The notifier reports results as they come (`stream`); `send_batch` runs a stream over one batch. After a
NotifierDown, close() and open() make it usable again.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

from campaign_manager.errors import ConfigError
from campaign_manager.notifiers import Message, Need, NotifierDown, Result, key

if TYPE_CHECKING:
    from campaign_manager.notifiers.smtp_pool import Pool

TLS_MODES = ("starttls", "implicit", "none")


class EmailSettings(NamedTuple):
    """[notifiers.email]"""

    host: Annotated[
        str | None, key("the SMTP server's host name", env="CM_NOTIFIERS_EMAIL_HOST", example='"smtp.example.com"')
    ] = None
    port: Annotated[int, key("the SMTP server's port", env="CM_NOTIFIERS_EMAIL_PORT")] = 587
    tls: Annotated[
        str,
        key(
            '"starttls" (required: nothing is sent to a server without it), "implicit" (port 465) or "none"',
            env="CM_NOTIFIERS_EMAIL_TLS",
        ),
    ] = "starttls"
    verify: Annotated[bool, key("check the server's certificate and name", env="CM_NOTIFIERS_EMAIL_VERIFY")] = True
    ca_file: Annotated[
        Path | None,
        key(
            "a PEM file of certificates to trust besides the system's (a private CA)",
            env="CM_NOTIFIERS_EMAIL_CA_FILE",
            example='"/etc/ssl/certs/private-ca.pem"',
        ),
    ] = None
    username: Annotated[
        str | None, key("the AUTH user name (no AUTH when unset)", env="CM_NOTIFIERS_EMAIL_USERNAME", example='"news"')
    ] = None
    password: Annotated[str | None, key("the AUTH password", env="CM_SMTP_PASSWORD", secret=True, example='""')] = None
    connections: Annotated[
        int, key("SMTP connections used at once, each reused", env="CM_NOTIFIERS_EMAIL_CONNECTIONS")
    ] = 8
    timeout: Annotated[float, key("seconds to wait for a connection or a reply", env="CM_NOTIFIERS_EMAIL_TIMEOUT")] = (
        30.0
    )
    rate: Annotated[
        float,
        key(
            "messages per second for this notifier, all campaigns together; 0 = no limit",
            env="CM_NOTIFIERS_EMAIL_RATE",
        ),
    ] = 0.0
    helo: Annotated[
        str | None,
        key(
            "the name given in EHLO (default: this machine's)",
            env="CM_NOTIFIERS_EMAIL_HELO",
            example='"mail.example.com"',
        ),
    ] = None


class PartialDown(NotifierDown):
    """NotifierDown from `send_batch` after some messages had their results: `results` (one per message, in
    order; None for a message with none). `stream` reports them as they come instead."""

    def __init__(self, reason: str, results: list[Result | None]) -> None:
        super().__init__(reason)
        self.results = results


class EmailNotifier:
    name = "email"
    config_class = EmailSettings
    needs = Need.EMAIL

    def __init__(self, config: EmailSettings) -> None:
        check_settings(config)
        self.config = config
        self._pool: Pool | None = None

    async def open(self) -> None:
        """Opens the connections (NotifierDown when none can be opened)."""
        # asyncio, ssl and aiosmtplib take ~130 ms to import: only a notifier that sends pays for them, not every
        # command that loads the plugins (`cm plugins`, `cm config show`).
        from campaign_manager.notifiers.smtp import Server
        from campaign_manager.notifiers.smtp_pool import Pool

        await self.close()
        c = self.config
        assert c.host is not None  # checked by check_settings
        server = Server(c.host, c.port, c.tls, c.verify, c.ca_file, c.username, c.password, c.timeout, c.helo)
        pool = Pool(server, c.connections)
        await pool.open()
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def stream(self, messages: AsyncIterator[Message]) -> AsyncIterator[tuple[Message, Result]]:
        """(message, result) for each message, as the server answers (opening the notifier first if need be);
        NotifierDown when the server cannot be used: a message taken from `messages` that got no result was not
        attempted. Messages are taken only as connections are ready for them: at most two a connection are
        unanswered at any time."""
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        async with contextlib.aclosing(self._pool.stream(messages)) as results:
            async for item in results:
                yield item

    async def send_batch(self, messages: Sequence[Message]) -> list[Result]:
        """One Result per message, in order (a stream over the batch); PartialDown if the server failed after
        some messages had results."""
        index = {id(message): i for i, message in enumerate(messages)}
        results: list[Result | None] = [None] * len(messages)

        async def feed() -> AsyncIterator[Message]:
            for message in messages:
                yield message

        try:
            async for message, result in self.stream(feed()):
                results[index[id(message)]] = result
        except NotifierDown as exc:
            if any(r is not None for r in results):
                raise PartialDown(exc.reason, results) from exc
            raise
        return [r for r in results if r is not None]


def check_settings(config: EmailSettings) -> None:
    """ConfigError for settings that cannot work or would expose the password (see the module's doc)."""
    if not config.host:
        raise ConfigError("notifiers.email.host is not set", hint="the SMTP server to send through")
    if config.tls not in TLS_MODES:
        raise ConfigError(f'notifiers.email.tls must be "starttls", "implicit" or "none", got {config.tls!r}')
    if config.connections < 1 or config.timeout <= 0 or not 0 < config.port < 65536:
        raise ConfigError("notifiers.email: connections must be at least 1, timeout above 0, port 1-65535")
    if config.username and config.tls == "none" and not is_loopback(config.host):
        raise ConfigError(
            f'notifiers.email: AUTH with tls = "none" would send the password in clear to {config.host}',
            hint='use tls = "starttls" or "implicit" (AUTH without TLS is allowed only to a loopback host)',
        )


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost` (not resolved: a name that points at 127.0.0.1 does not count)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
