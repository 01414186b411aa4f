"""The sending loop: claim deliveries, render them, hand them to the notifier, record what came back.

One asyncio loop per send. The database is only touched from threads (`asyncio.to_thread`), so a slow commit never
stalls the connections. Messages flow:

    claim (a batch, in a thread) -> render -> rate limit -> room to record? -> notifier -> results -> record

- A notifier with `stream` (email) reports each result as it completes; one with only `send_batch` gets chunks
  (in a thread when it is a plain function).
- Results are recorded at least every `send.record_batch` results or `send.record_interval` seconds, and no new
  message goes out while that many are unrecorded: a crash can re-send at most the messages in flight plus the
  unrecorded results (the bound the README states).
- The notifier itself failing (`NotifierDown`) counts no attempt: the claims not yet answered are given back, the
  send waits (doubling, at most five minutes) and opens the notifier again; after `send.max_outage` the caller
  pauses the campaign.
- `stop()` (a pause seen in the database, a signal, the worker giving the job back) ends it cleanly: the messages
  in flight finish, their results are recorded, unsent claims are given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from campaign_manager.notifiers import Message, NotifierDown, Result

log = logging.getLogger("campaign_manager.send")

CHUNK = 50  # messages a `send_batch` call gets at most
MAX_BACKOFF = 300.0  # seconds between attempts to reach a notifier that is down


@dataclass
class Hooks:
    """What the loop needs from the database and the campaign (the service supplies them; each runs in a thread)."""

    claim: Callable[[], list[Any] | None]  # the next batch of targets; [] when none is due; None: stop (paused ...)
    render: Callable[[Any], Message | Result]  # a target's message, or the result it gets without sending
    record: Callable[[list[tuple[Any, Result]]], None]  # write results
    release: Callable[[list[Any]], None]  # give back targets never handed to the notifier
    progress: Callable[[int], None] = lambda done: None  # after each flush, with the results recorded so far


@dataclass
class Totals:
    recorded: int = 0
    down: str | None = None  # the last NotifierDown's reason, while the notifier is down
    down_since: float | None = None


@dataclass
class Pacer:
    """`rate` messages a second at most (0: no limit), with a burst of a tenth of a second's worth."""

    rate: float
    _next: float = 0.0

    async def wait(self) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        burst = max(1.0, self.rate / 10) / self.rate
        self._next = max(self._next, now - burst) + 1.0 / self.rate
        if self._next > now:
            await asyncio.sleep(self._next - now)


@dataclass
class Recorder:
    hooks: Hooks
    batch: int
    interval: float
    totals: Totals
    db: Callable[..., Any]
    pending: list[tuple[Any, Result]] = field(default_factory=list)
    _writing: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _room: asyncio.Event = field(default_factory=asyncio.Event)
    # The flush `add` started, while it has not finished: one at a time (each add used to start one until the
    # first took the lock, writing many small batches), and held here (the loop keeps only a weak reference).
    _flushing: asyncio.Task[None] | None = None

    def add(self, target: Any, result: Result) -> None:
        self.pending.append((target, result))
        if len(self.pending) >= self.batch and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self.flush())

    async def room(self) -> None:
        """Wait while `batch` results are unrecorded (those waiting and those being written)."""
        while len(self.pending) + self._writing >= self.batch:
            if not self._lock.locked():
                await self.flush()
                continue
            self._room.clear()
            await self._room.wait()

    async def flush(self) -> None:
        async with self._lock:
            if not self.pending:
                return
            items, self.pending = self.pending, []
            self._writing = len(items)
            try:
                await self.db(self.hooks.record, items)
            except BaseException:
                self.pending[:0] = items  # not written: the caller's error path decides
                raise
            finally:
                self._writing = 0
                self._room.set()
            self.totals.recorded += len(items)
        self.hooks.progress(self.totals.recorded)

    async def ticking(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.pending:
                await self.flush()


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _batched(notifier: Any, messages: AsyncIterator[Message]) -> AsyncIterator[tuple[Message, Result]]:
    """`stream` for a notifier that only has `send_batch`: chunks of what is ready, at most CHUNK. A task feeds a
    queue from `messages` (waiting on a queue can be given up safely; on a generator it cannot)."""
    call = notifier.send_batch
    threaded = not inspect.iscoroutinefunction(call)
    ready: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=CHUNK)

    async def feed() -> None:
        async for message in messages:
            await ready.put(message)
        await ready.put(None)

    async def next_ready() -> Message | None:
        """The next message (None at the end); the feeder's error, if it failed."""
        getter = asyncio.ensure_future(ready.get())
        await asyncio.wait({getter, feeder}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        feeder.result()  # raises what stopped it
        return None

    feeder = asyncio.create_task(feed())
    try:
        ended = False
        while not ended:
            first = await next_ready()
            if first is None:
                break
            chunk = [first]
            while len(chunk) < CHUNK and not ready.empty():
                item = ready.get_nowait()
                if item is None:
                    ended = True
                    break
                chunk.append(item)
            results = await (asyncio.to_thread(call, chunk) if threaded else call(chunk))
            if len(results) != len(chunk):
                raise NotifierDown(f"the notifier returned {len(results)} results for {len(chunk)} messages")
            for message, result in zip(chunk, results, strict=True):
                yield message, result
    finally:
        if not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder


class Sender:
    """One send: `await Sender(...).run()` until nothing is due or `stop()`."""

    def __init__(
        self,
        notifier: Any,
        hooks: Hooks,
        *,
        rate: float,
        record_batch: int,
        record_interval: float,
        max_outage: float,
    ) -> None:
        self.notifier, self.hooks = notifier, hooks
        self.pacer = Pacer(rate)
        self.totals = Totals()
        # Every database call of a send runs on this one thread, which keeps its connection (db.get_engine's
        # `kept`): the loop never waits on the database, and the database work does not interleave.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cm-send-db")
        self.recorder = Recorder(hooks, max(1, record_batch), max(0.01, record_interval), self.totals, self.db)
        self.max_outage = max_outage
        self.stopping = False
        self.wakeup: asyncio.Event | None = None

    def db(self, call: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """`call(*args)` on the database thread."""
        return asyncio.get_running_loop().run_in_executor(self.executor, partial(call, *args))

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def stop(self) -> None:
        self.stopping = True
        if self.wakeup is not None:
            self.wakeup.set()

    async def run(self) -> str:
        """Send until nothing is due ("idle"), a stop ("stopped") or an outage past `max_outage` ("down")."""
        self.wakeup = asyncio.Event()
        ticker = asyncio.create_task(self.recorder.ticking())
        delay = 1.0
        try:
            while not self.stopping:
                try:
                    await _maybe(getattr(self.notifier, "open", lambda: None)())
                    try:
                        ended = await self._pump()
                    finally:
                        await _maybe(getattr(self.notifier, "close", lambda: None)())
                    self.totals.down = self.totals.down_since = None
                    return "stopped" if self.stopping else ended
                except NotifierDown as exc:
                    now = time.monotonic()
                    self.totals.down = exc.reason
                    self.totals.down_since = self.totals.down_since or now
                    await self.recorder.flush()
                    if now - self.totals.down_since >= self.max_outage:
                        return "down"
                    wait = min(MAX_BACKOFF, exc.retry_after or delay)
                    log.warning("the notifier is down (%s); trying again in %.0f s", exc.reason, wait)
                    delay = min(MAX_BACKOFF, delay * 2)
                    self.wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wakeup.wait(), timeout=wait)
            return "stopped"
        finally:
            ticker.cancel()
            await self.recorder.flush()

    async def _pump(self) -> str:
        """One session with the notifier: feed it until nothing is due or a stop; returns "idle" or "stopped"."""
        in_flight: dict[str, Any] = {}  # handed to the notifier, not yet answered
        waiting: deque[Any] = deque()  # claimed, not yet handed over
        unsent: list[Any] = []
        ended = ["idle"]
        drained = asyncio.Event()  # nothing in flight

        async def messages() -> AsyncGenerator[Message]:
            while not self.stopping:
                # The next batch is claimed only once this one has been answered: an opt-out that commits while
                # a batch goes out is honoured by the next (at most one claimed batch can still go out).
                while in_flight:
                    drained.clear()
                    await drained.wait()
                claiming = asyncio.ensure_future(self.db(self.hooks.claim))
                try:
                    batch = await asyncio.shield(claiming)
                except asyncio.CancelledError:
                    unsent.extend(await claiming or [])  # claimed all the same: give them back below
                    raise
                if batch is None:
                    ended[0] = "stopped"
                    self.stopping = True
                    return
                if not batch:
                    return
                waiting.extend(batch)
                while waiting:
                    if self.stopping:
                        return  # what is still waiting is given back below
                    target = waiting[0]
                    made = self.hooks.render(target)
                    if isinstance(made, Result):
                        waiting.popleft()
                        self.recorder.add(target, made)
                        continue
                    await self.pacer.wait()
                    await self.recorder.room()
                    in_flight[made.key] = waiting.popleft()
                    yield made

        stream = getattr(self.notifier, "stream", None)
        source = messages()
        results = stream(source) if stream is not None else _batched(self.notifier, source)
        try:
            async for message, result in results:
                target = in_flight.pop(message.key, None)
                if target is not None:
                    self.recorder.add(target, result)
                if not in_flight:
                    drained.set()
        finally:
            await source.aclose()
            # Claimed but never handed over, or handed over and never answered (the notifier went down, a stop):
            # given back, no attempt counted.
            unsent.extend(waiting)
            unsent.extend(in_flight.values())
            if unsent:
                await self.recorder.flush()
                await self.db(self.hooks.release, list(unsent))
        return ended[0]


def run(sender: Sender, *, poll: Callable[[], bool] | None = None, every: float = 0.5) -> str:
    """Run a send to its end in a new event loop. `poll()` (in a thread, every `every` seconds) returning True
    stops it (a pause seen in the database, a signal)."""

    async def main() -> str:
        watcher: asyncio.Task[None] | None = None
        if poll is not None:

            async def watch() -> None:
                while True:
                    await asyncio.sleep(every)
                    if await sender.db(poll):
                        sender.stop()
                        return

            watcher = asyncio.create_task(watch())
        try:
            return await sender.run()
        finally:
            if watcher is not None:
                watcher.cancel()

    return asyncio.run(main())
