"""The email notifier's wire level: replies parsed whatever chunks they arrive in (checked on a real socket's
transport, chunk by chunk, for every way hypothesis cuts them, and end to end against servers that answer one byte
at a time or all replies at once), and dot-stuffing."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign_manager.notifiers import smtp_wire
from campaign_manager.notifiers.smtp_wire import Down, Reply, Wire, stuff
from email_helpers import messages, send, sent_all, settings
from smtp_server import SmtpServer

STREAM = (
    b"250-smtp.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 HELP\r\n"
    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    b"250 \r\n250\r\n550-5.1.1 no such\n550 5.1.1 user\n421 4.3.2 closing\r\n"
)
EXPECTED = [
    Reply(250, "smtp.test PIPELINING SIZE 1000 HELP"),
    Reply(250, "2.1.0 Ok"),
    Reply(250, "2.1.5 Ok"),
    Reply(354, "End data with <CR><LF>.<CR><LF>"),
    Reply(250, ""),
    Reply(250, ""),
    Reply(550, "5.1.1 no such 5.1.1 user"),
    Reply(421, "4.3.2 closing"),
]


def _on_a_socket(chunks: list[bytes]) -> tuple[list[Reply], str | None]:
    """Feeds `chunks` to a Wire over a real (idle) socket's transport; the replies it parsed, and why it closed."""

    async def run() -> tuple[list[Reply], str | None]:
        ours, theirs = socket.socketpair()
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
        wire = Wire(transport, timeout=1.0)  # type: ignore[arg-type]
        for chunk in chunks:
            wire.data_received(chunk)
        replies = list(wire.replies)
        transport.close()
        theirs.close()
        return replies, wire.closed

    return asyncio.run(run())


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_replies_are_parsed_however_the_bytes_are_cut(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    replies, closed = _on_a_socket([STREAM[a:b] for a, b in itertools.pairwise(points)])
    assert replies == EXPECTED and closed is None


def test_one_byte_at_a_time_and_all_at_once() -> None:
    assert _on_a_socket([STREAM[i : i + 1] for i in range(len(STREAM))])[0] == EXPECTED
    assert _on_a_socket([STREAM])[0] == EXPECTED


@pytest.mark.parametrize("junk", [b"hello there\r\n", b"25 short\r\n", b"2500 long\r\n", b"250x\r\n"])
def test_a_malformed_reply_closes_the_connection(junk: bytes) -> None:
    replies, closed = _on_a_socket([b"250 Ok\r\n" + junk + b"250 Ok\r\n"])
    assert replies == [Reply(250, "Ok")] and closed is not None and closed.startswith("malformed reply")


def test_an_endless_reply_closes_the_connection() -> None:
    _, closed = _on_a_socket([b"250-" + b"x" * 1000 + b"\r\n"] * (smtp_wire.MAX_REPLY // 1000 + 2))
    assert closed == "a reply longer than 64 KB"


def test_a_read_that_waits_too_long_is_down() -> None:
    async def run() -> str:
        ours, theirs = socket.socketpair()
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
        wire = Wire(transport, timeout=0.05)  # type: ignore[arg-type]
        wire.data_received(b"250 Ok\r\n")
        try:
            await wire.read(2)
        except Down as exc:
            return exc.reason
        finally:
            transport.close()
            theirs.close()
        return "no timeout"

    assert asyncio.run(run()) == "no reply within 0.05 s"


def _unstuff(wire_data: bytes) -> bytes:
    """What a server keeps: up to the CRLF.CRLF, each line's leading dot removed."""
    body, end, rest = wire_data.partition(b"\r\n.\r\n")
    assert (end and rest == b"") or wire_data == b".\r\n"
    lines = (body + b"\r\n").split(b"\r\n")[:-1] if end else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: x\r\n\r\nbody\r\n",
        b".starts with a dot\r\n.\r\n..\r\n. \r\nend\r\n",
        b"no final line end",
        b".",
        b"",
    ],
)
def test_stuffing_is_undone_by_the_server_rule(data: bytes) -> None:
    sent = stuff(data)
    expected = data if data.endswith(b"\r\n") or not data else data + b"\r\n"
    assert sent.endswith(b"\r\n.\r\n") or sent == b".\r\n"
    assert _unstuff(sent) == expected
    assert stuff(data, b"MAIL FROM:<a@b>\r\n") == sent + b"MAIL FROM:<a@b>\r\n"


@pytest.mark.parametrize("replies", ["bytes", "together"])
def test_pipelined_replies_split_to_single_bytes_or_merged_in_one_chunk(
    smtp_server_factory: Callable[..., SmtpServer], monkeypatch: pytest.MonkeyPatch, replies: str
) -> None:
    chunks: list[bytes] = []
    original = Wire.data_received

    def watched(self: Wire, data: bytes) -> None:
        chunks.append(data)
        original(self, data)

    monkeypatch.setattr(Wire, "data_received", watched)
    server = smtp_server_factory(replies=replies)
    items = messages(4)
    results, down = send(settings(server, connections=1), items)
    assert down is None and sent_all(results, items)
    assert [r.data for r in server.messages] == [m.data for m in items]
    if replies == "bytes":
        assert sum(len(chunk) == 1 for chunk in chunks) > 200  # the replies came a byte at a time
    else:
        # The final reply and the next message's three in one chunk (Postfix's way).
        assert max(chunk.count(b"\r\n") for chunk in chunks) >= 4
