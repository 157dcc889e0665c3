"""The decision audit log: a pipeline observer, a bounded queue, and a dispatcher.

On the request path ``observe`` does one ``put_nowait`` of what it was given (the decision,
its facts, the time); when the queue is full the record is dropped and counted, so a
decision never waits for the audit log. The dispatcher task lets decisions gather for
``linger`` seconds (50 ms; not when a batch is full already): a sink's write costs
about the same for one record as for hundreds, and at a few thousand decisions a second
one write per record would cost more CPU than the records. It then takes them in batches,
builds each record (the input document too, for cache hits), redacts it (the
one choke point: nothing reaches a sink unredacted), renders its JSON once, and hands the
batch to every sink's writer (see ``writer.py``). ``stop`` flushes what is queued, within a
time bound, and counts whatever it could not write.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .record import AuditRecord, RecordBuilder, query_path
from .redact import Redactor
from .sinks import open_sink
from .sinks.base import Sink
from .writer import Backoff, RateLimitedLog, SinkWriter, WriterStats

if TYPE_CHECKING:
    from ..decision import Decision
    from ..facts import Facts

log = logging.getLogger("authz_server.audit")

DEFAULT_QUERY = "data.envoy.authz.allow"
_ALL = "all"  # the metrics' sink label for what happens before the fan-out


def default_labels() -> dict[str, str]:
    """OPA's ``labels``: the app, this instance's id (new per start) and our version."""
    from importlib import metadata

    try:
        version = metadata.version("authz-server")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"app": "authz-server", "id": str(uuid.uuid4()), "version": version}


class AuditLog:
    def __init__(self, sinks: Sequence[Sink], *, query: str = DEFAULT_QUERY, queue_size: int = 10_000,
                 batch_size: int = 500, sink_backlog: int = 10_000, flush_timeout: float = 5.0,
                 labels: Mapping[str, str] | None = None, redactor: Redactor | None = None,
                 backoff: Backoff = Backoff(), clock: Callable[[], float] = time.time, linger: float = 0.05) -> None:
        self.queue: asyncio.Queue[tuple[Decision, Facts | None, float, float]] = asyncio.Queue(queue_size)
        self.writers = [SinkWriter(sink, backlog=sink_backlog, batch_size=batch_size, backoff=backoff)
                        for sink in sinks]
        self.labels = dict(labels) if labels is not None else default_labels()
        self.records = RecordBuilder(path=query_path(query), labels=self.labels, redactor=redactor or Redactor())
        self.batch_size = batch_size
        self.linger = linger
        self.flush_timeout = flush_timeout
        self.stats = WriterStats()  # before the fan-out: queue_full, render_failed, shutdown
        self._clock = clock
        self._closed = False
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._wake = asyncio.Event()  # set by observe: the dispatcher waits on it, leaving the queue as it is
        self._log = RateLimitedLog(log)

    @classmethod
    def from_specs(cls, specs: Iterable[str], **options: Any) -> "AuditLog":
        return cls([open_sink(spec) for spec in specs], **options)

    # -- on the request path
    def observe(self, decision: "Decision", facts: "Facts | None", now: float) -> None:
        """The pipeline observer: enqueue or count a drop. Never blocks, never raises."""
        if self._closed:
            self.stats.drop("shutdown", 1)
            return
        try:
            self.queue.put_nowait((decision, facts, now, self._clock()))
        except asyncio.QueueFull:
            dropped = self.stats.dropped
            dropped["queue_full"] = dropped.get("queue_full", 0) + 1
        self._wake.set()

    # -- the writer side
    def start(self) -> None:
        for writer in self.writers:
            writer.start()
        if self._task is None:
            self._task = asyncio.create_task(self._dispatch(), name="audit-dispatch")

    async def drain(self) -> None:
        """Return once everything observed so far has been written (or dropped)."""
        while True:
            if not self.queue.empty():
                self._idle.clear()
                await self._idle.wait()
            for writer in self.writers:
                await writer.wait_idle()
            if self.queue.empty() and not any(writer.depth for writer in self.writers):
                return

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking records, flush the queue and the sinks' backlogs for at most
        ``timeout`` seconds (default ``flush_timeout``), close the sinks. Idempotent."""
        self._closed = True
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.flush_timeout if timeout is None else timeout)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while not self.queue.empty():
            if loop.time() >= deadline:
                self.stats.drop("shutdown", self.queue.qsize())
                break
            self._fan_out(self._take_batch())
            await asyncio.sleep(0)
        await asyncio.gather(*(writer.close(max(deadline - loop.time(), 0.0)) for writer in self.writers))
        while not self.queue.empty():  # left over when the deadline passed
            self.queue.get_nowait()

    async def _dispatch(self) -> None:
        # Decisions stay in the queue while they gather, so drain() and stop() see them.
        queue = self.queue
        while True:
            if queue.empty():
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.linger and queue.qsize() < self.batch_size:
                await asyncio.sleep(self.linger)
            self._fan_out(self._take_batch())
            await asyncio.sleep(0)  # let requests in between batches

    def _take_batch(self) -> list[Any]:
        items: list[Any] = []
        queue = self.queue
        while len(items) < self.batch_size and not queue.empty():
            items.append(queue.get_nowait())
        return items

    def _fan_out(self, items: list[Any]) -> None:
        records = self.render(items)
        for writer in self.writers:
            writer.offer(records)

    def render(self, items: Iterable[tuple["Decision", "Facts | None", float, float]]) -> list[AuditRecord]:
        records = []
        for decision, facts, now, observed in items:
            try:
                records.append(self.records.build(decision, facts, now,
                                                  handler_ns=max(int((observed - now) * 1e9), 0)))
            except Exception:  # a bug here must cost one record, not the audit log
                self.stats.drop("render_failed", 1)
                self._log.warning("could not build the audit record of decision %s", decision.decision_id,
                                  exc_info=True)
        return records

    # -- metrics, read when scraped
    def collect(self) -> Iterable[object]:
        written = CounterMetricFamily("authz_audit_records_written", "Audit records written, by sink",
                                      labels=["sink"])
        errors = CounterMetricFamily("authz_audit_sink_errors", "Failed sink writes (each retry counts)",
                                     labels=["sink"])
        dropped = CounterMetricFamily("authz_audit_records_dropped",
                                      "Audit records dropped: queue_full (decision queue), sink_backlog (a sink "
                                      "fell behind), sink_failed, render_failed, shutdown",
                                      labels=["sink", "reason"])
        depth = GaugeMetricFamily("authz_audit_queue_depth", "Records waiting: the decision queue and each sink",
                                  labels=["queue"])
        depth.add_metric(["decisions"], self.queue.qsize())
        for reason in ("queue_full", "render_failed", "shutdown"):
            dropped.add_metric([_ALL, reason], self.stats.dropped.get(reason, 0))
        for writer in self.writers:
            name = writer.sink.name
            written.add_metric([name], writer.stats.written)
            errors.add_metric([name], writer.stats.errors)
            for reason in ("sink_backlog", "sink_failed", "shutdown"):
                dropped.add_metric([name, reason], writer.stats.dropped.get(reason, 0))
            depth.add_metric([name], writer.depth)
        yield from (written, dropped, errors, depth)
