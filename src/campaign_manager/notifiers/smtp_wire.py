"""The bytes of an SMTP connection once aiosmtplib has opened it: `Wire`, the protocol that writes commands and
parses every reply, and `stuff`, the data as DATA sends it.

aiosmtplib's own protocol parses only the first reply of each chunk it receives and drops what arrives while no
command is pending: pipelined replies are lost when a server answers them in separate segments (aiosmtpd does) and
merged when it sends them in one (smtp-sink does). `Wire` takes them however the bytes are cut.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple

from campaign_manager.notifiers import Message

MAX_REPLY = 64 * 1024  # bytes of one reply (or of a line without its end) before the server counts as broken


class Down(Exception):
    """The connection failed (see campaign_manager.notifiers.smtp). `carry`: the messages it had taken and not
    attempted, to be sent on another connection; `stale`: found closed before any command (an idle timeout)."""

    def __init__(self, reason: str, *, stale: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stale = stale
        self.carry: list[Message] = []


class Reply(NamedTuple):
    code: int
    text: str

    def line(self) -> str:
        """One line for a reason: code and text (a multi-line reply's lines joined)."""
        return f"{self.code} {self.text}".strip()[:500]


def stuff(data: bytes, tail: bytes = b"") -> bytes:
    """`data` (CRLF line ends, as Message.data) as DATA sends it: a dot doubled at the start of every line, the
    terminating CRLF.CRLF, then `tail` (the next commands), in one copy: `replace` returns `data` itself when no
    line starts with a dot."""
    body = data.replace(b"\n.", b"\n..")
    parts = [b".", body] if body[:1] == b"." else [body]
    if body and not body.endswith(b"\r\n"):
        parts.append(b"\r\n")
    parts.append(b".\r\n" + tail)
    return b"".join(parts)


class Wire(asyncio.Protocol):
    """Our side of a connection once aiosmtplib has opened it: writes commands, parses every reply into a queue,
    whatever chunks they arrive in (several replies in one, one reply over several), and wakes the reader when
    the replies it waits for are all there."""

    def __init__(self, transport: asyncio.Transport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout
        self.replies: deque[Reply] = deque()
        self.closed: str | None = None  # why the connection ended
        self._loop = asyncio.get_running_loop()
        self._rest = b""  # an incomplete line
        self._lines: list[bytes] = []  # the continuation lines of a reply not yet complete
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        start, lines = 0, self._lines
        while (end := data.find(b"\n", start)) >= 0:
            line = data[start:end].rstrip(b"\r")
            start = end + 1
            code = line[:3]
            if not code.isdigit() or len(code) < 3 or line[3:4] not in (b"", b" ", b"-"):
                self._lose(f"malformed reply {line[:80]!r}")
                return
            if line[3:4] == b"-":
                lines.append(line[4:])
                continue
            text = b" ".join((*lines, line[4:])) if lines else line[4:]
            lines.clear()
            self.replies.append(Reply(int(code), text.decode("utf-8", "replace").strip()))
        self._rest = data[start:]
        if len(self._rest) + sum(map(len, lines)) > MAX_REPLY:
            self._lose("a reply longer than 64 KB")
            return
        waiter = self._waiter
        if waiter is not None and len(self.replies) >= self._want and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            self.closed = f"connection lost ({exc})" if exc else "connection closed by the server"
            # A server that says 421 and closes leaves pipelined commands unanswered: the 421 is the reason.
            self.closed = next((r.line() for r in self.replies if r.code == 421), self.closed)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(Down(self.closed))
        self.resume_writing()  # a writer waiting to drain goes on, and finds the connection closed

    def pause_writing(self) -> None:
        self._paused = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    def _lose(self, reason: str) -> None:
        self.closed = reason
        self.transport.abort()

    def write(self, data: bytes) -> None:
        if self.closed is not None:
            raise Down(self.closed)
        self.transport.write(data)

    async def drain(self) -> None:
        """Waits while the transport's buffer is full (a large message to a slow server)."""
        if self._paused is not None:
            await self._paused

    async def read(self, count: int) -> list[Reply]:
        """The next `count` replies; Down when the connection ends or they take longer than the timeout."""
        if len(self.replies) < count:
            if self.closed is not None:
                raise Down(self.closed)
            self._want = count
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(self.timeout, self._time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        pop = self.replies.popleft
        return [pop() for _ in range(count)]

    def _time_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(Down(f"no reply within {self.timeout:g} s"))
