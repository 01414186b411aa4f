"""One SMTP connection of the email notifier, with ESMTP PIPELINING (RFC 2920).

aiosmtplib opens the connection (TLS, EHLO, STARTTLS, AUTH); then `Session` hands its transport to `Wire`
(smtp_wire), a small protocol of our own (`transport.set_protocol`) that parses every reply however the bytes are
cut, which aiosmtplib's does not do for pipelined replies; `Session` says QUIT itself. When the server offers
PIPELINING, a message costs one round trip: MAIL, RCPT and DATA go out in one write and their replies are read
together; the data goes out with the next message's MAIL, RCPT and DATA behind it. Without PIPELINING the same
commands go one at a time. Every reply is checked.

What a reply means (one recipient per transaction): 4xx to RCPT (552 too, as RFC 5321 says) or to the data is a
`retry`; 5xx a `failed`, a bounce when its enhanced status is 5.1.x. A reply to MAIL other than 2xx, a 421
anywhere, a timeout or a disconnect is `Down`: the connection's fault, not the message's. A message whose data went
out and whose final reply never came gets `Result.retry(uncertain=True)`: the server may have taken it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

import aiosmtplib

from campaign_manager.notifiers import Message, Result
from campaign_manager.notifiers.smtp_wire import Down, Reply, Wire, stuff

Emit = Callable[[Message, Result], None]  # reports one message's result
_QUEUE_ID = re.compile(r"queued as (\S+)|\bid=(\S+)", re.IGNORECASE)
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


class Server(NamedTuple):
    """Where and how to connect (built from EmailSettings, checked there)."""

    host: str
    port: int
    tls: str  # "starttls" | "implicit" | "none"
    verify: bool
    ca_file: Path | None
    username: str | None
    password: str | None
    timeout: float
    helo: str | None


class Messages(Protocol):
    """Where a session takes its messages from (smtp_pool.Source, shared by the connections)."""

    def poll(self) -> Message | None:
        """A message ready now, or None."""

    async def get(self) -> Message | None:
        """The next message, waiting for it; None when there are no more."""


def provider_id(reply: Reply, message: Message) -> str:
    """The queue id in the final reply ("queued as X", "id=X"), else the Message-ID, else the reply's text."""
    found = _QUEUE_ID.search(reply.text)
    if found:
        return (found.group(1) or found.group(2)).rstrip(".,;)")
    return message.message_id or reply.text


def _refusal(reply: Reply, *, rcpt: bool) -> Result:
    """A 4xx or 5xx about one recipient or message (421 and MAIL are handled before)."""
    if reply.code // 100 == 4 or (rcpt and reply.code == 552):
        return Result.retry(reply.line())
    return Result.failed(reply.line(), bounce=reply.text.startswith("5.1."))


def _check(reply: Reply, command: str, ok: int = 2) -> None:
    """Down for a reply that is not the connection going on: 421, and anything but `ok` (a class like 2 or a code
    like 354) that is not a 4xx or 5xx about the message."""
    if reply.code == 421 or not (400 <= reply.code < 600 or _ok(reply, ok)):
        raise Down(f"{command}: {reply.line()}")


def _ok(reply: Reply, ok: int) -> bool:
    return reply.code // 100 == ok if ok < 10 else reply.code == ok


class Session:
    """One connection: `connect`, then `run` once per stream of messages, then `quit`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.wire: Wire | None = None
        self.pipelining = False
        self.completed = 0  # transactions answered since the last connect
        self.taken: list[Message] = []  # taken and not attempted (their commands may be written)
        self.in_data: Message | None = None  # its data went out, its final reply has not come
        self._client: aiosmtplib.SMTP | None = None
        self._eight_bit = False
        self._rset = False  # a refused transaction is still open on the server: RSET before the next MAIL
        self._froms: dict[str, bytes] = {}

    @property
    def alive(self) -> bool:
        return self.wire is not None and self.wire.closed is None

    async def connect(self) -> None:
        """Connect, EHLO, STARTTLS (required with tls = "starttls": nothing is sent to a server that does not
        offer it), AUTH; Down on any failure."""
        self.abort()
        s = self.server
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=s.helo,
            timeout=s.timeout,
            use_tls=s.tls == "implicit",
            start_tls=False,
            validate_certs=s.verify,
            cert_bundle=str(s.ca_file) if s.ca_file else None,
        )
        step = f"connect to {s.host}:{s.port}"
        try:
            await client.connect()
            step = "EHLO"
            await client.ehlo()
            if s.tls == "starttls":
                if not client.supports_extension("starttls"):
                    raise Down(f'{s.host}:{s.port} does not offer STARTTLS, which tls = "starttls" requires')
                step = "STARTTLS"
                await client.starttls()
                step = "EHLO"
                await client.ehlo()
            if s.username:
                step = "AUTH"
                await client.login(s.username, s.password or "")
        except Down:
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise Down(f"{step}: {_describe(exc)}") from None
        assert isinstance(client.transport, asyncio.Transport)
        self.pipelining = client.supports_extension("pipelining")
        self._eight_bit = client.supports_extension("8bitmime")
        self._client, self.wire = client, Wire(client.transport, s.timeout)
        self.completed, self._rset = 0, False

    async def quit(self) -> None:
        wire = self.wire
        if wire is not None and wire.closed is None:
            wire.timeout = min(wire.timeout, 5.0)
            try:
                wire.write(b"QUIT\r\n")
                await wire.read(len(wire.replies) + 1)
            except Down:
                pass
        self.abort()

    def abort(self) -> None:
        """Closes the connection without QUIT (after a failure, or when a stream is abandoned)."""
        if self.wire is not None:
            self.wire.transport.abort()
            self.wire = None
        if self._client is not None:
            self._client.close()  # resets aiosmtplib's state
            self._client = None

    async def run(self, messages: Messages, emit: Emit) -> None:
        """Sends messages until `messages` has no more. When the connection fails: emits the uncertain retry of
        the message whose data went out (handed to the transport: whether the server has it is unknown), and raises
        Down with the messages taken and not attempted in `carry`."""
        wire = self.wire
        if wire is None or wire.closed is not None or wire.replies:
            why = (wire.closed or "a reply while idle") if wire is not None else "not connected"
            self.abort()
            raise Down(f"connection unusable: {why}", stale=True)
        try:
            if self.pipelining:
                await self._pipelined(wire, messages, emit)
            else:
                await self._one_by_one(wire, messages, emit)
        except Down as exc:
            if self.in_data is not None:
                emit(self.in_data, Result.retry(exc.reason, uncertain=True))
                self.in_data = None
            exc.carry, self.taken = self.taken, []
            self.abort()
            raise
        except BaseException:  # cancelled, or the messages' iterator failed: the connection's state is unknown
            self.in_data, self.taken = None, []
            self.abort()
            raise

    async def _pipelined(self, wire: Wire, messages: Messages, emit: Emit) -> None:
        message = await self._next(messages, emit)
        if message is None:
            return
        count = self._write_group(wire, message)
        while True:
            replies = await wire.read(count)
            if count == 4 and (reset := replies.pop(0)).code != 250:
                raise Down(f"RSET: {reset.line()}")
            following: Message | None
            mail, rcpt, data = replies
            refusal = self._envelope(message, mail, rcpt, data, emit)
            if refusal:
                following = await self._next(messages, emit)
                if following is None:
                    return
                count = self._write_group(wire, following)
            else:
                # The data, and the next message's commands right behind it when one is ready.
                following = self._poll(messages, emit)
                wire.write(stuff(message.data, self._group(following) if following else b""))
                await wire.drain()
                self.taken.remove(message)
                self.in_data = message
                self._finish(message, (await wire.read(1))[0], emit)
                count = 3
                if following is None:
                    following = await self._next(messages, emit)
                    if following is None:
                        return
                    count = self._write_group(wire, following)
            message = following

    async def _one_by_one(self, wire: Wire, messages: Messages, emit: Emit) -> None:
        while (message := await self._next(messages, emit)) is not None:
            if self._rset:
                wire.write(b"RSET\r\n")
                if (reply := (await wire.read(1))[0]).code != 250:
                    raise Down(f"RSET: {reply.line()}")
                self._rset = False
            mail, rcpt = self._commands(message)
            wire.write(mail)
            mail_reply = (await wire.read(1))[0]
            if mail_reply.code // 100 != 2:
                raise Down(f"MAIL FROM: {mail_reply.line()}")
            wire.write(rcpt)
            rcpt_reply = (await wire.read(1))[0]
            data_reply = Reply(0, "")  # not sent
            if rcpt_reply.code // 100 == 2:
                wire.write(b"DATA\r\n")
                data_reply = (await wire.read(1))[0]
            if self._envelope(message, mail_reply, rcpt_reply, data_reply, emit):
                continue
            wire.write(stuff(message.data))
            await wire.drain()
            self.taken.remove(message)
            self.in_data = message
            self._finish(message, (await wire.read(1))[0], emit)

    def _envelope(self, message: Message, mail: Reply, rcpt: Reply, data: Reply, emit: Emit) -> bool:
        """Checks the replies to MAIL, RCPT and DATA: True when the message was refused (its result emitted),
        False when its data may go; Down for the connection's failures."""
        if mail.code // 100 != 2:
            raise Down(f"MAIL FROM: {mail.line()}")
        _check(rcpt, "RCPT TO")
        refusal = None if rcpt.code // 100 == 2 else _refusal(rcpt, rcpt=True)
        if refusal is None:
            _check(data, "DATA", 354)
            if data.code == 354:
                return False
            refusal = _refusal(data, rcpt=False)
        self.taken.remove(message)
        emit(message, refusal)
        self.completed += 1
        self._rset = True
        if data.code in (354, 421):  # 354 after a refused RCPT: a server that breaks RFC 2920; start afresh
            raise Down(f"DATA: {data.line()}")
        return True

    def _finish(self, message: Message, final: Reply, emit: Emit) -> None:
        """The final reply to a message's data."""
        if final.code == 421:
            self.in_data = None
            self.taken.insert(0, message)  # not taken by the server: to be sent again, no attempt counted
        if final.code == 421 or not 200 <= final.code < 600 or final.code // 100 == 3:
            raise Down(f"end of data: {final.line()}")
        self.in_data = None
        self.completed += 1
        if final.code // 100 == 2:
            emit(message, Result.sent(provider_id(final, message)))
        else:
            emit(message, _refusal(final, rcpt=False))

    async def _next(self, messages: Messages, emit: Emit) -> Message | None:
        """The next message SMTP can carry, waiting for one (the others fail here)."""
        while True:
            message = messages.poll() or await messages.get()
            if message is None or self._sendable(message, emit):
                return message

    def _poll(self, messages: Messages, emit: Emit) -> Message | None:
        while (message := messages.poll()) is not None:
            if self._sendable(message, emit):
                return message
        return None

    def _sendable(self, message: Message, emit: Emit) -> bool:
        for address in (message.envelope_from, message.to):
            if not address.isascii() or _BAD_ADDRESS.search(address):
                emit(message, Result.failed("an address SMTP cannot carry (not ASCII, or a control character)"))
                return False
        self.taken.append(message)
        return True

    def _commands(self, message: Message) -> tuple[bytes, bytes]:
        """MAIL FROM and RCPT TO for `message`, each with its CRLF."""
        mail = self._froms.get(message.envelope_from)
        if mail is None:
            mail = self._froms[message.envelope_from] = b"MAIL FROM:<%s>" % message.envelope_from.encode()
        if self._eight_bit and not message.data.isascii():
            mail += b" BODY=8BITMIME"
        return mail + b"\r\n", b"RCPT TO:<%s>\r\n" % message.to.encode()

    def _group(self, message: Message) -> bytes:
        mail, rcpt = self._commands(message)
        return mail + rcpt + b"DATA\r\n"

    def _write_group(self, wire: Wire, message: Message) -> int:
        """Writes (RSET and) MAIL, RCPT, DATA in one go; returns how many replies they will get."""
        rset, self._rset = self._rset, False
        wire.write((b"RSET\r\n" if rset else b"") + self._group(message))
        return 4 if rset else 3


def _describe(exc: BaseException) -> str:
    """An aiosmtplib or socket error as one line."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"{exc.code} {exc.message}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:500]
