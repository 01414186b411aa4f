"""The email notifier against real SMTP servers: aiosmtpd (tests/smtp_server.py, which records what it receives and
injects faults) and postfix's smtp-sink (tests/smtp_sink.py), with and without PIPELINING. Every message must arrive
exactly once with its bytes intact, and every reply must become the right Result or NotifierDown."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest

from campaign_manager.notifiers import Message, NotifierDown, Result
from campaign_manager.notifiers.email import EmailNotifier, PartialDown
from campaign_manager.notifiers.smtp_wire import Wire
from email_helpers import collect, feed, message, messages, send, sent_all, settings
from smtp_server import SmtpServer
from smtp_sink import SmtpSink

Servers = Callable[..., SmtpServer]


def _received(items: list[Message]) -> Counter[tuple[str, tuple[str, ...], bytes]]:
    return Counter((m.envelope_from, (m.to,), m.data) for m in items)


@pytest.mark.parametrize(
    ("pipelining", "replies"), [(True, "each"), (True, "together"), (False, "each"), (False, "together")]
)
def test_aiosmtpd_receives_every_message_once_with_its_bytes(
    smtp_server_factory: Servers, pipelining: bool, replies: str
) -> None:
    server = smtp_server_factory(pipelining=pipelining, replies=replies)
    items = messages(40)
    results, down = send(settings(server, connections=3), items)
    assert down is None and sent_all(results, items)
    assert results["1-7"].provider_id.startswith("Q")  # the queue id of "250 2.0.0 OK queued as Q12"
    got = Counter((r.mail_from, tuple(r.rcpt), r.data) for r in server.messages)
    assert got == _received(items) and all(r.acknowledged for r in server.messages)
    assert server.connections == 3
    mails = [c for c in server.commands if c.verb == "MAIL"]
    ends = [c for c in server.commands if c.verb == "."]
    if pipelining:
        # MAIL, RCPT and DATA in one write; the next message's commands behind each message's data, but for the
        # last one on each connection.
        assert all(c.followed for c in mails)
        assert sum(c.followed for c in ends) >= len(items) - 3
    else:
        assert not any(c.followed for c in server.commands)  # never pipelined to a server that did not offer it


@pytest.mark.parametrize("flags", [(), ("-p",)], ids=["pipelining", "no-pipelining"])
def test_smtp_sink_receives_every_message_once_with_its_bytes(
    smtp_sink_factory: Callable[..., SmtpSink], flags: tuple[str, ...]
) -> None:
    sink = smtp_sink_factory(*flags)
    items = messages(60)
    results, down = send(settings(sink, connections=4), items)
    assert down is None and sent_all(results, items)
    assert results["1-3"].provider_id == "<3.test@example.com>"  # smtp-sink gives no queue id: the Message-ID
    assert Counter((m.mail_from, tuple(m.rcpt), m.data) for m in sink.messages()) == _received(items)


def test_a_large_message_waits_for_the_transport_to_drain(
    smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[bool] = []
    original = Wire.pause_writing

    def watched(self: Wire) -> None:
        pauses.append(True)
        original(self)

    monkeypatch.setattr(Wire, "pause_writing", watched)
    # 12 MB: more than the socket takes at once (tcp_wmem allows 4 MB), so the transport's buffer fills.
    big = message(1, body="{i}\r\n" + ("x" * 990 + "\r\n.dot\r\n") * 12_000)
    assert len(big.data) > 11_000_000
    items = [message(0), big, message(2)]
    results, down = send(settings(smtp_server, connections=1), items)
    assert down is None and sent_all(results, items)
    assert [r.data for r in smtp_server.messages] == [m.data for m in items]
    assert pauses  # the transport's buffer did fill


def test_connections_are_all_used_and_take_messages_only_when_ready(smtp_server: SmtpServer) -> None:
    taken, answered, outstanding = 0, 0, []

    async def counted(items: list[Message]) -> AsyncIterator[Message]:
        nonlocal taken
        for item in items:
            taken += 1
            outstanding.append(taken - answered)
            yield item

    async def run() -> None:
        nonlocal answered
        notifier = EmailNotifier(settings(smtp_server, connections=4))
        await notifier.open()
        async for _, result in notifier.stream(counted(messages(80))):
            assert result.outcome == "sent"
            answered += 1
        await notifier.close()

    asyncio.run(run())
    assert answered == 80 and smtp_server.connections == 4
    assert len({m.session for m in smtp_server.messages}) == 4
    # Two a connection at most (one with its data out, the next behind it), and the results of one round of
    # the connections not yet read by the consumer: never the whole input.
    assert max(outstanding) <= 3 * 4
    assert {c.session for c in smtp_server.commands if c.verb == "QUIT"} == {m.session for m in smtp_server.messages}


# --- replies about one recipient or message


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
@pytest.mark.parametrize(
    ("command", "reply", "outcome", "bounce"),
    [
        ("RCPT", "451 4.7.1 greylisted, try again", "retry", False),
        ("RCPT", "452 4.2.2 mailbox full", "retry", False),
        ("RCPT", "552 5.2.2 mailbox over quota", "retry", False),  # counts as 452 (RFC 5321)
        ("RCPT", "550 5.1.1 no such user", "failed", True),
        ("RCPT", "550 5.7.1 relaying denied", "failed", False),
        ("DATA", "451 4.3.0 local problem", "retry", False),
        ("DATA", "554 5.5.1 no valid recipients", "failed", False),
        (".", "451 4.7.0 try again later", "retry", False),
        (".", "554 5.7.1 spam detected", "failed", False),
        (".", "550 5.1.1 user gone", "failed", True),
    ],
)
def test_a_refusal_is_that_messages_result_and_the_others_go_on(
    smtp_server_factory: Servers, pipelining: bool, command: str, reply: str, outcome: str, bounce: bool
) -> None:
    server = smtp_server_factory(pipelining=pipelining)
    server.reply(command, reply, to="user2@example.com")
    items = messages(6)
    results, down = send(settings(server, connections=1), items)
    assert down is None
    assert results["1-2"] == Result(outcome, reason=reply, bounce=bounce)
    assert all(results[m.key].outcome == "sent" for m in items if m.key != "1-2")
    taken = [m for m in items if m.key != "1-2"] if command != "." else items
    assert Counter(r.data for r in server.messages) == Counter(m.data for m in taken)
    # A refused RCPT or DATA leaves the transaction open: reset once; a refused message ends it.
    assert [c.verb for c in server.commands].count("RSET") == (0 if command == "." else 1)


def test_an_address_smtp_cannot_carry_fails_without_reaching_the_server(smtp_server: SmtpServer) -> None:
    items = [message(0), message(1, to="bad\r\nRCPT TO:<x@example.com>"), message(2, to="jürgen@example.com")]
    results, down = send(settings(smtp_server), items)
    assert down is None and results["1-0"].outcome == "sent"
    assert results["1-1"].outcome == results["1-2"].outcome == "failed"
    assert [r.rcpt for r in smtp_server.messages] == [["user0@example.com"]]
    assert [c.arg for c in smtp_server.commands if c.verb == "RCPT"] == ["TO:<user0@example.com>"]


# --- failures of the server or the connection


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
@pytest.mark.parametrize(
    ("command", "reply"),
    [("MAIL", "451 4.3.0 sender check failed"), ("MAIL", "550 5.7.1 sender refused"), ("RCPT", "421 4.3.2 bye")],
)
def test_the_servers_failure_is_notifier_down_and_counts_against_no_message(
    smtp_server_factory: Servers, pipelining: bool, command: str, reply: str
) -> None:
    server = smtp_server_factory(pipelining=pipelining)
    server.reply(command, reply, after=3)
    items = messages(8)
    results, down = send(settings(server, connections=2), items)
    assert down is not None and reply in down.reason
    # At least the first three went (another connection may have had its MAIL taken before the third arrived).
    assert len(server.messages) >= 3 and {r.outcome for r in results.values()} == {"sent"}
    assert set(results) == {m.key for m in items if m.data in {r.data for r in server.messages}}


def test_421_after_some_messages_stops_the_stream_with_those_sent(smtp_server: SmtpServer) -> None:
    smtp_server.reply("MAIL", "421 4.7.0 too many messages, closing", after=5)
    items = messages(12)
    results, down = send(settings(smtp_server, connections=3), items)
    assert down is not None and down.reason.endswith("421 4.7.0 too many messages, closing")
    assert len(results) == len(smtp_server.messages) >= 5
    assert sent_all(results, [m for m in items if m.to in {r.rcpt[0] for r in smtp_server.messages}])


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_a_connection_dropped_mid_session_is_opened_again(smtp_server_factory: Servers, pipelining: bool) -> None:
    server = smtp_server_factory(pipelining=pipelining)
    server.disconnect("MAIL", after=2, times=1)
    items = messages(6)
    results, down = send(settings(server, connections=1), items)
    assert down is None and sent_all(results, items)
    assert Counter(r.data for r in server.messages) == Counter(m.data for m in items)  # each exactly once
    assert server.connections == 2


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_a_drop_after_the_data_makes_that_message_uncertain(smtp_server_factory: Servers, pipelining: bool) -> None:
    server = smtp_server_factory(pipelining=pipelining)
    server.disconnect(".", to="user3@example.com", times=1)
    items = messages(7)
    results, down = send(settings(server, connections=1), items)
    assert down is None
    assert results["1-3"].outcome == "retry" and results["1-3"].uncertain
    assert results["1-3"].reason == "connection closed by the server"
    assert sent_all({k: r for k, r in results.items() if k != "1-3"}, [m for m in items if m.key != "1-3"])
    # The server has it, unacknowledged; the message pipelined behind it went again on the next connection.
    assert [r.acknowledged for r in server.messages if r.rcpt == ["user3@example.com"]] == [False]
    assert Counter(r.data for r in server.messages) == Counter(m.data for m in items)


def test_a_stalled_final_reply_times_out_as_uncertain(smtp_server: SmtpServer) -> None:
    smtp_server.stall(".", 3.0, to="user1@example.com", times=1)
    results, down = send(settings(smtp_server, connections=1, timeout=0.5), messages(4))
    assert down is None and results["1-1"] == Result.retry("no reply within 0.5 s", uncertain=True)
    assert [results[f"1-{i}"].outcome for i in (0, 2, 3)] == ["sent"] * 3


def test_a_stall_before_the_data_loses_nothing(smtp_server: SmtpServer) -> None:
    smtp_server.stall("RCPT", 3.0, to="user1@example.com", times=1)
    items = messages(4)
    results, down = send(settings(smtp_server, connections=1, timeout=0.5), items)
    assert down is None and sent_all(results, items)  # not attempted on the stalled connection: sent on the next
    assert len(smtp_server.messages) == 4


def test_a_connection_that_keeps_failing_gives_up(smtp_server: SmtpServer) -> None:
    smtp_server.disconnect(".")
    results, down = send(settings(smtp_server, connections=1), messages(5))
    # Opened once again after the first drop; the second drop with nothing answered in between gives up.
    assert down is not None and down.reason == "connection closed by the server"
    assert len(results) == 2 and all(r.outcome == "retry" and r.uncertain for r in results.values())
    assert smtp_server.connections == 2


def test_a_server_that_is_not_there_is_notifier_down_at_open(smtp_server: SmtpServer) -> None:
    smtp_server.stop()
    results, down = send(settings(smtp_server), messages(2))
    assert down is not None and down.reason.startswith(f"connect to 127.0.0.1:{smtp_server.port}: ")
    assert results == {}


def test_ehlo_refused_is_notifier_down(smtp_server: SmtpServer) -> None:
    smtp_server.reply("EHLO", "554 5.7.1 no service for you")
    _, down = send(settings(smtp_server), messages(1))
    assert down is not None and down.reason == "EHLO: 554 5.7.1 no service for you"
    assert smtp_server.messages == []


def test_down_then_up_the_notifier_works_again_after_close_and_open(smtp_server: SmtpServer) -> None:
    async def run() -> tuple[NotifierDown | None, dict[str, Result]]:
        notifier = EmailNotifier(settings(smtp_server, connections=2))
        await notifier.open()
        first, _ = await collect(notifier, messages(3))
        smtp_server.stop()
        second, down = await collect(notifier, messages(3, start=3))
        assert first and not second
        smtp_server.start()
        await notifier.close()
        await notifier.open()
        third, again = await collect(notifier, messages(3, start=3))
        await notifier.close()
        assert again is None
        return down, {m.key: r for m, r in first + third}

    down, results = asyncio.run(run())
    assert down is not None and down.reason.startswith("connect to ")
    assert sent_all(results, messages(6))
    assert sorted(r.rcpt[0] for r in smtp_server.messages) == sorted(m.to for m in messages(6))


def test_connections_the_server_closed_while_idle_are_opened_again(smtp_server_factory: Servers) -> None:
    server = smtp_server_factory(idle_timeout=0.3)

    async def run() -> list[tuple[Message, Result]]:
        notifier = EmailNotifier(settings(server, connections=2))
        await notifier.open()
        first, _ = await collect(notifier, messages(4))
        await asyncio.sleep(0.8)  # the server closes both connections
        second, down = await collect(notifier, messages(4, start=4))
        await notifier.close()
        assert down is None
        return first + second

    results = {m.key: r for m, r in asyncio.run(run())}
    assert sent_all(results, messages(8)) and len(server.messages) == 8
    assert server.connections == 4


def test_a_stream_abandoned_midway_leaves_the_notifier_usable(smtp_server: SmtpServer) -> None:
    async def run() -> dict[str, Result]:
        notifier = EmailNotifier(settings(smtp_server, connections=2))
        got: dict[str, Result] = {}
        async with contextlib.aclosing(notifier.stream(feed(messages(50)))) as results:
            async for item, result in results:
                got[item.key] = result
                if len(got) == 3:
                    break
        rest, down = await collect(notifier, messages(5, start=50))
        await notifier.close()
        assert down is None
        return got | {m.key: r for m, r in rest}

    results = asyncio.run(run())
    assert len(results) == 8 and all(r.outcome == "sent" for r in results.values())
    assert {f"1-{i}" for i in range(50, 55)} <= set(results)
    # Messages abandoned in flight may have reached the server; none twice.
    assert max(Counter(r.data for r in smtp_server.messages).values()) == 1


def test_send_batch_gives_results_in_order_and_partial_ones_on_failure(smtp_server: SmtpServer) -> None:
    smtp_server.reply("RCPT", "550 5.1.1 no such user", to="user1@example.com")
    smtp_server.reply("MAIL", "421 4.3.2 going down", after=5)

    async def run() -> tuple[list[Result], PartialDown]:
        notifier = EmailNotifier(settings(smtp_server, connections=1))
        try:
            first = await notifier.send_batch(messages(4))
            with pytest.raises(PartialDown) as caught:
                await notifier.send_batch(messages(4, start=4))
            return first, caught.value
        finally:
            await notifier.close()

    first, partial = asyncio.run(run())
    assert [r.outcome for r in first] == ["sent", "failed", "sent", "sent"]
    assert partial.reason.endswith("421 4.3.2 going down")
    assert [r and r.outcome for r in partial.results] == ["sent", "sent", None, None]


def test_stream_reports_the_iterators_own_error(smtp_server: SmtpServer) -> None:
    async def broken() -> AsyncIterator[Message]:
        yield message(0)
        raise ValueError("the ledger went away")

    async def run() -> None:
        notifier = EmailNotifier(settings(smtp_server, connections=2))
        try:
            with pytest.raises(ValueError, match="the ledger went away"):
                async for _ in notifier.stream(broken()):
                    pass
        finally:
            await notifier.close()

    asyncio.run(run())
