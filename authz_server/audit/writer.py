"""One writer per sink: a bounded backlog, batches, retry with backoff, counted drops.

Each sink has its own backlog, so a database that is down fills only its own backlog
while stdout and the file keep being written. While a sink is unavailable the writer holds
the batch in hand and retries it (exponential backoff with jitter, reconnecting each time);
records that arrive meanwhile wait in the backlog, and once that is full they are dropped
and counted (``sink_backlog``). A batch the sink refuses for what it contains is dropped and
counted (``sink_failed``). Errors are logged at most once per ``log_interval`` per sink.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from .record import AuditRecord
from .sinks.base import Sink, SinkUnavailable

log = logging.getLogger("authz_server.audit")


class RateLimitedLog:
    """At most one message per ``interval``; the next one says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def warning(self, message: str, *args: object, exc_info: BaseException | bool | None = None) -> None:
        """``logging.Logger.warning``, held back when the last one was under ``interval`` ago;
        ``exc_info`` as the logging module takes it (an exception, or True for the current one)."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} similar messages suppressed)"
        self._logger.warning(message, *args, exc_info=exc_info)
        self._last = now
        self.suppressed = 0


@dataclass
class WriterStats:
    written: int = 0
    errors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> records

    def drop(self, reason: str, count: int) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.05
    maximum: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * (0.5 + random.random())  # jitter: replicas do not retry in lockstep
            delay = min(delay * 2, self.maximum)


class SinkWriter:
    def __init__(self, sink: Sink, *, backlog: int = 10_000, batch_size: int = 500,
                 backoff: Backoff = Backoff(), log_interval: float = 10.0) -> None:
        self.sink = sink
        self.capacity = backlog
        self.batch_size = batch_size
        self.backoff = backoff
        self.stats = WriterStats()
        self._backlog: deque[AuditRecord] = deque()
        self._in_hand = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(log, log_interval)

    @property
    def depth(self) -> int:
        """Records waiting for this sink, including the batch being written."""
        return len(self._backlog) + self._in_hand

    def offer(self, records: Sequence[AuditRecord]) -> None:
        room = self.capacity - len(self._backlog)
        if room < len(records):
            self.stats.drop("sink_backlog", len(records) - max(room, 0))
            records = records[:max(room, 0)]
        if records:
            self._backlog.extend(records)
            self._idle.clear()
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"audit-writer {self.sink.name}")

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self, timeout: float) -> None:
        """Write what is in the backlog (for at most ``timeout`` s), then close the sink."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
            self._task = None
        self.stats.drop("shutdown", self.depth)
        self._backlog.clear()
        self._in_hand = 0
        try:
            await asyncio.wait_for(self.sink.close(), max(timeout, 1.0))
        except Exception as exc:
            log.warning("audit sink %s did not close cleanly: %s", self.sink.name, exc)

    async def _run(self) -> None:
        while True:
            while not self._backlog:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            count = min(self.batch_size, len(self._backlog))
            batch = [self._backlog.popleft() for _ in range(count)]
            self._in_hand = count
            await self._deliver(batch)
            self._in_hand = 0

    async def _deliver(self, batch: list[AuditRecord]) -> None:
        delays = self.backoff.delays()
        while True:
            try:
                await self.sink.write_batch(batch)
            except SinkUnavailable as exc:
                self.stats.errors += 1
                self._log.warning("audit sink %s unavailable, retrying with backoff (%d records waiting): %s",
                                  self.sink.name, self.depth, exc.message)
                await asyncio.sleep(next(delays))
                continue
            except Exception as exc:  # the batch itself is refused: retrying cannot help
                self.stats.errors += 1
                self.stats.drop("sink_failed", len(batch))
                self._log.warning("audit sink %s refused a batch of %d records: %s", self.sink.name, len(batch),
                                  getattr(exc, "message", None) or repr(exc))
                return
            self.stats.written += len(batch)
            return

