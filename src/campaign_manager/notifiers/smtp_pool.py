"""The email notifier's connections: up to `connections` SMTP sessions sending one stream of messages together.

Each connection takes the next message from the shared `Source` when it is ready for it, so the messages taken and
not yet answered are at most two a connection (one whose data is out, the next one's commands behind it), plus one
the iterator is still producing when it had to wait. A connection that fails is opened again once; one that fails again
before any transaction is answered gives up, and hands the messages it had taken back to the others. When every
connection has given up with messages left, the stream raises NotifierDown: the server is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from typing import Any, NamedTuple

from campaign_manager.notifiers import Message, NotifierDown, Result
from campaign_manager.notifiers.smtp import Emit, Server, Session
from campaign_manager.notifiers.smtp_wire import Down

Item = tuple[Message, Result]

log = logging.getLogger(__name__)


class Source:
    """The messages to send, shared by a notifier's connections; each takes one when it is ready to send it.

    Taking one does not wait when the iterator has one ready (its `__anext__` is stepped right there: a generator
    that yields from memory answers at once), so a connection about to send its data can write the next message's
    commands behind it. When the iterator has to wait, a task drives the step on and the message goes to the next
    connection that asks. Messages a failed connection had taken without attempting them are given back, and go
    out first."""

    def __init__(self, messages: AsyncIterator[Message]) -> None:
        self._messages = messages
        self._back: deque[Message] = deque()
        self._next: asyncio.Task[Message] | None = None  # a step of the iterator that had to wait
        self._woken: asyncio.Future[None] | None = None
        self.exhausted = False

    @property
    def finished(self) -> bool:
        """Every message was taken (none given back, none being fetched)."""
        return self.exhausted and not self._back and self._next is None

    def poll(self) -> Message | None:
        """A message if one is ready now, else None (and one is being fetched)."""
        if self._back:
            return self._back.popleft()
        task = self._next
        if task is not None:
            if not task.done():
                return None
            self._next = None
            if isinstance(task.exception(), StopAsyncIteration):
                self.exhausted = True
                return None
            return task.result()  # raises what the iterator raised
        if self.exhausted:
            return None
        step = self._messages.__anext__().__await__()
        try:
            first = step.send(None)
        except StopIteration as ready:
            message: Message = ready.value
            return message
        except StopAsyncIteration:
            self.exhausted = True
            return None
        self._next = asyncio.ensure_future(_finish(step, first))
        return None

    async def get(self) -> Message | None:
        """The next message, waiting for one; None when there are no more."""
        while True:
            message = self.poll()
            if message is not None or self.finished:
                return message
            if self._woken is None or self._woken.done():
                self._woken = asyncio.get_running_loop().create_future()
            assert self._next is not None
            await asyncio.wait((self._next, self._woken), return_when=asyncio.FIRST_COMPLETED)

    def give_back(self, messages: list[Message]) -> None:
        self._back.extendleft(reversed(messages))
        if messages and self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    def close(self) -> None:
        """Stops fetching: a step still waiting is cancelled (its message, if any, was never sent)."""
        if self._next is not None:
            self._next.cancel()
            self._next = None
        self.exhausted = True


async def _finish(step: Generator[Any, None, Message], first: Any) -> Message:
    return await _Resumed(step, first)


class _Resumed:
    """The rest of an iterator step begun in `Source.poll`: hands what it yielded (the future it waits for) to the
    task, then goes on with it, as `await` would have (`yield from` cannot take over a started step)."""

    def __init__(self, step: Generator[Any, None, Message], first: Any) -> None:
        self._step, self._first = step, first

    def __await__(self) -> Generator[Any, Any, Message]:
        step, value = self._step, self._first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancelled while waiting: into the step
                try:
                    value = step.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                value = step.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


class _End(NamedTuple):
    """A connection's worker is done: `reason` why it gave up (None: no more messages), or the `error` it met."""

    reason: str | None = None
    error: BaseException | None = None


class Pool:
    """The connections of one opened notifier, and the streams they send (one at a time)."""

    def __init__(self, server: Server, connections: int) -> None:
        self.server = server
        self.sessions = [Session(server) for _ in range(connections)]
        self._streaming = False

    async def open(self) -> None:
        """Opens every connection at once; NotifierDown when none opens (a connection that fails is tried again
        by the next stream)."""
        outcomes = await asyncio.gather(*(s.connect() for s in self.sessions), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, Down):
                await self.close()
                raise failure
        if len(failures) == len(self.sessions):
            raise NotifierDown(str(failures[0]))
        if failures:
            log.warning("email: %d of %d connections failed to open: %s", len(failures), len(outcomes), failures[0])

    async def close(self) -> None:
        await asyncio.gather(*(s.quit() for s in self.sessions), return_exceptions=True)

    async def stream(self, messages: AsyncIterator[Message]) -> AsyncGenerator[Item, None]:
        """(message, result) as the results come; see the module's doc."""
        if self._streaming:
            raise RuntimeError("the email notifier sends one stream at a time")
        self._streaming = True
        source = Source(messages)
        queue: asyncio.Queue[Item | _End] = asyncio.Queue()

        def emit(message: Message, result: Result) -> None:
            queue.put_nowait((message, result))

        workers = [asyncio.create_task(self._work(s, source, emit, queue)) for s in self.sessions]
        running, reasons = len(workers), []
        try:
            while running:
                item = await queue.get()
                if isinstance(item, _End):
                    running -= 1
                    if item.error is not None:
                        raise item.error
                    if item.reason is not None:
                        reasons.append(item.reason)
                    continue
                yield item
            if reasons and not source.finished:
                raise NotifierDown(reasons[-1])
        finally:
            self._streaming = False
            for worker in workers:
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*workers, return_exceptions=True)
            source.close()

    async def _work(self, session: Session, source: Source, emit: Emit, queue: asyncio.Queue[Item | _End]) -> None:
        """One connection's part of a stream: sends until the source is empty, opening the connection again
        once after a failure (again after each failure that follows answered transactions)."""
        strikes = 0
        try:
            while True:
                try:
                    if not session.alive:
                        await session.connect()
                    await session.run(source, emit)
                    queue.put_nowait(_End())
                    return
                except Down as exc:
                    source.give_back(exc.carry)
                    if exc.stale:
                        continue
                    strikes = 1 if session.completed else strikes + 1
                    if strikes > 1:
                        log.warning("email: a connection gives up: %s", exc.reason)
                        session.abort()
                        queue.put_nowait(_End(reason=exc.reason))
                        return
                    log.info("email: a connection failed, opening it again: %s", exc.reason)
                    session.completed = 0
        except asyncio.CancelledError:
            session.abort()
            raise
        except Exception as exc:  # the messages' iterator failed: the stream raises it
            session.abort()
            queue.put_nowait(_End(error=exc))
