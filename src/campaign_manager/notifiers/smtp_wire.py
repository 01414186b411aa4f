"""The bytes of an SMTP connection once aiosmtplib has opened it: `Wire`, the protocol that writes commands and
parses every reply, and `stuff`, the data as DATA sends it.

aiosmtplib's own protocol parses only the first reply of each chunk it receives and drops what arrives while no
command is pending: pipelined replies are lost when a server answers them in separate segments (aiosmtpd does) and
merged when it sends them in one (smtp-sink does). `Wire` takes them however the bytes are cut.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import NamedTuple

from campaign_manager.notifiers import Message

MAX_REPLY = 64 * 1024  # bytes of one reply (or of a line without its end) before the server counts as broken
# A reply line: three digits, then a space and text (the last line of a reply), a hyphen and text (more lines
# follow), or the line's end; CRLF or a bare LF.
_new_reply = tuple.__new__  # builds a Reply without NamedTuple's Python-level __new__ (this runs per reply)
_LINE = re.compile(rb"^([0-9]{3})(?:([ -])([^\r\n]*))?\r?\n", re.MULTILINE)


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
        self._deadline = 0.0
        self._watch: asyncio.TimerHandle | None = None
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        end = data.rfind(b"\n") + 1
        lines = self._lines
        if end:
            found, bad = _LINE.findall(data, 0, end), None
            if len(found) != data.count(b"\n", 0, end):  # a line that is not a reply line: up to it, one by one
                found, pos = [], 0
                while match := _LINE.match(data, pos, end):
                    found.append(match.groups(b""))
                    pos = match.end()
                bad = data[pos : data.find(b"\n", pos)]
            append = self.replies.append
            for code, more, text in found:
                if more == b"-":
                    lines.append(text)
                    continue
                if lines:
                    text = b" ".join((*lines, text))
                    lines.clear()
                append(_new_reply(Reply, (int(code), text.decode("utf-8", "replace").strip())))
            if bad is not None:
                self._lose(f"malformed reply {bad[:80]!r}")
                return
            data = data[end:]
        self._rest = data
        if len(data) + sum(map(len, lines)) > MAX_REPLY:
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
        if self._watch is not None:
            self._watch.cancel()
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
        """Waits while the transport's buffer is full (a large message to a slow server), at most the timeout."""
        if self._paused is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._paused), self.timeout)
            except TimeoutError:
                raise Down(f"could not write within {self.timeout:g} s") from None

    async def read(self, count: int) -> list[Reply]:
        """The next `count` replies; Down when the connection ends or they take longer than the timeout."""
        if len(self.replies) < count:
            if self.closed is not None:
                raise Down(self.closed)
            self._want = count
            waiter = self._waiter = self._loop.create_future()
            # One timer a connection, moved on lazily, rather than one set and cancelled for every read.
            self._deadline = self._loop.time() + self.timeout
            if self._watch is None:
                self._watch = self._loop.call_at(self._deadline, self._check_time)
            try:
                await waiter
            finally:
                self._waiter = None
        pop = self.replies.popleft
        return [pop() for _ in range(count)]

    def _check_time(self) -> None:
        self._watch, waiter = None, self._waiter
        if waiter is None or waiter.done():
            return
        if self._loop.time() < self._deadline:
            self._watch = self._loop.call_at(self._deadline, self._check_time)
        else:
            waiter.set_exception(Down(f"no reply within {self.timeout:g} s"))
