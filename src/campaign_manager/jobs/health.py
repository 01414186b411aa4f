"""What the threads of one worker share about the faults around them: an outage of the queue or of the database,
retried with a backoff that one log line an attempt reports."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from campaign_manager.errors import DatabaseError

if TYPE_CHECKING:
    pass

log = logging.getLogger("campaign_manager.worker")


FIRST_RETRY_S, MAX_RETRY_S = 1.0, 60.0  # a fault (queue or database unreachable): wait 1 s, doubling up to 60 s


class Outage:
    """A fault the threads of one worker share (the queue, or the database, cannot be reached): one log line an
    attempt, attempts spaced by a delay that doubles from FIRST_RETRY_S to MAX_RETRY_S, cleared by a success.
    Threads that fail during one round add nothing: the round was logged and counted once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.delay = 0.0  # 0: no fault
        self._next_try = 0.0  # time.monotonic() of the next attempt

    def failed(self, line: str | None) -> float:
        """Note a failed attempt and log `line` (None: the caller has said it already) with the delay; returns
        the seconds to wait before the next attempt."""
        with self._lock:
            now = time.monotonic()
            if self.delay and now < self._next_try:
                return self._next_try - now
            self.delay = min(max(self.delay * 2, FIRST_RETRY_S), MAX_RETRY_S)
            self._next_try = now + self.delay
            if line is not None:
                log.warning("%s (trying again in %s s)", line, f"{self.delay:g}")
            return self.delay

    def succeeded(self, line: str | None = None) -> None:
        with self._lock:
            if self.delay and line is not None:
                log.info("%s", line)
            self.delay = 0.0

    def wait_turn(self, stop: threading.Event) -> bool:
        """Wait until the next attempt is due (at once if there is no fault); False if `stop` was set."""
        with self._lock:
            remaining = self._next_try - time.monotonic() if self.delay else 0.0
        return not (stop.wait(remaining) if remaining > 0 else stop.is_set())


@dataclass
class Health:
    """What the threads of one worker (or drain) share about the faults around them."""

    queue: Outage = field(default_factory=Outage)
    database: Outage = field(default_factory=Outage)
    stop: threading.Event = field(default_factory=threading.Event)  # the consumer's stop flag, once it runs
    fatal: DatabaseError | None = None  # why the worker must stop (its database file was deleted or replaced)
    fault: DatabaseError | None = None  # the last time the database could not be written or reached

    def stop_for(self, exc: DatabaseError) -> None:
        """Stop the worker (the CLI then prints `exc`, once)."""
        self.fatal = self.fatal or exc
        self.stop.set()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
