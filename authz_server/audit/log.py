"""The decision audit log: a pipeline observer, a bounded queue, build passes, the writers.

On the request path ``observe`` appends what it was given (the decision, its facts, the
time) to a bounded queue; when the queue is full the record is dropped and counted, so a
decision never waits for the audit log.

Records are built on the event loop, in passes that never hold it for more than a slice. Every
``build_every`` seconds (5 ms) a pass builds queued records (the input document too, for cache
hits), redacts each (the one choke point: nothing reaches a sink unredacted) and renders its
JSON line once, for every sink (see ``record.py``), until ``slice_seconds`` (0.5 ms: a few
dozen records of a repeated request, a few of new ones) have gone; what is left goes in the
next pass, scheduled at once, after the loop has polled its sockets. An answer waits for the
audit log at most one slice, whatever the batch size.

Why the loop and not a thread of its own: the building is Python either way, so it needs the
GIL the loop needs. A thread that holds it when a request comes makes the loop wait for the end
of its slice, then for the thread's switch back; on the loop a pass is simply one more callback
between two answers. Measured through Envoy (``tests.bench --only audit``, the same machine,
three runs back to back), one connection's p99 with the audit log on against off: 1.01 / 0.97 / 1.00 /
0.90 and 0.96 / 1.17 / 1.14 / 1.06 (gRPC repeated, gRPC not repeating, HTTP repeated, HTTP not
repeating) against 1.45 / 1.05 / 1.73 / 1.05 with the thread. What it can cost: in gRPC mode a
thread could also build while the loop waited inside gRPC's C core, so where the loop is what
limits throughput (gRPC, traffic that does not repeat, 32 connections) the loop now does that
work too: on / off 0.81 and 0.91 against the thread's 0.88.
Before either, the dispatcher built a whole batch on the loop, 25 ms at a time at 2,600
decisions a second, and that was the tail of every answer behind it.

Built records are held until the oldest has waited ``linger`` seconds (50 ms) or a batch is
full, then go to every sink's writer (``writer.py``), which only moves the list (a sink's
write costs about the same for one record as for hundreds): the sinks write from threads of
their own, never on the loop. A record that cannot be built is counted (``render_failed``)
and replaced by a short one saying so (``RecordBuilder.build_failed``); it never stops the
passes. ``stop`` flushes what is queued, within a time bound, and counts whatever it could
not write.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .builder import RecordBuilder
from .record import AuditRecord, query_path
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
_Item = tuple["Decision", "Facts | None", float, float]  # decision, facts, now, when observed


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
                 backoff: Backoff = Backoff(), clock: Callable[[], float] = time.time, linger: float = 0.05,
                 build_every: float = 0.005, slice_seconds: float = 0.0005) -> None:
        self.queue: collections.deque[_Item] = collections.deque()
        self.queue_size = queue_size
        self.writers = [SinkWriter(sink, backlog=sink_backlog, batch_size=batch_size, backoff=backoff)
                        for sink in sinks]
        self.labels = dict(labels) if labels is not None else default_labels()
        self.records = RecordBuilder(path=query_path(query), labels=self.labels, redactor=redactor or Redactor())
        self.batch_size = batch_size
        self.linger = linger  # how long built records wait for more before the writers get them
        self.build_every = min(build_every, linger)
        self.slice_seconds = slice_seconds  # building before a pass gives the event loop back
        self.flush_timeout = flush_timeout
        self.stats = WriterStats()  # before the fan-out: queue_full, render_failed, shutdown
        self.built = 0  # records the passes built (short ones included)
        self.cpu_seconds = 0.0  # CPU the passes spent on them: the audit log's cost, measured where it is paid
        self._clock = clock
        self._closed = False
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_pass: asyncio.Handle | None = None
        self._held: list[AuditRecord] = []  # built, waiting for the linger
        self._held_taken = 0  # decisions taken from the queue for them (a failed build holds no record)
        self._held_since = 0.0  # monotonic time the oldest of them was built
        self._log = RateLimitedLog(log)

    @classmethod
    def from_specs(cls, specs: Iterable[str], **options: Any) -> "AuditLog":
        return cls([open_sink(spec) for spec in specs], **options)

    @property
    def pending(self) -> int:
        """Decisions observed and not yet handed to the writers."""
        return len(self.queue) + self._held_taken

    # -- on the request path
    def observe(self, decision: "Decision", facts: "Facts | None", now: float) -> None:
        """The pipeline observer: one append, or a drop counted. Never blocks, never raises."""
        if self._closed:
            self.stats.drop("shutdown", 1)
            return
        queue = self.queue
        if len(queue) >= self.queue_size:
            dropped = self.stats.dropped
            dropped["queue_full"] = dropped.get("queue_full", 0) + 1
            return
        queue.append((decision, facts, now, self._clock()))

    # -- the writer side
    def start(self) -> None:
        for writer in self.writers:
            writer.start()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._next_pass = self._loop.call_later(self.linger, self._pass, True)

    async def drain(self) -> None:
        """Return once everything observed so far has been written (or dropped)."""
        while True:
            await self._flush(None)
            for writer in self.writers:
                await writer.wait_idle()
            if not self.pending and not any(writer.depth for writer in self.writers):
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
        if self._next_pass is not None:
            self._next_pass.cancel()
            self._next_pass = None
        await self._flush(deadline)
        left = len(self.queue)
        self.queue.clear()
        self.stats.drop("shutdown", left)
        await asyncio.gather(*(writer.close(max(deadline - loop.time(), 0.0)) for writer in self.writers))

    async def _flush(self, deadline: float | None) -> None:
        """Build everything queued, a slice at a time with the loop's turn between (until
        ``deadline``, loop time, if given), and hand it all over now."""
        loop = asyncio.get_running_loop()
        while self.queue and (deadline is None or loop.time() < deadline):
            self._build_slice()
            await asyncio.sleep(0)
        if self._held_taken:
            self._hand_over_held()

    # -- the build passes, on the event loop
    def _pass(self, idle: bool = False) -> None:
        """Build for one slice; hand over what is held once a batch is full or it has lingered
        (at once after an idle wait: what came meanwhile has lingered enough); schedule the
        next pass: at once while records are left, after ``build_every`` while records come
        or are held, else (nothing came since the last pass) after a whole ``linger``: idle,
        the audit log does not wake the loop 200 times a second."""
        loop = self._loop
        assert loop is not None
        came = bool(self.queue)
        try:
            self._build_slice()
            if self._held_taken and (idle or time.monotonic() - self._held_since >= self.linger):
                self._hand_over_held()
        finally:
            if self.queue:
                self._next_pass = loop.call_soon(self._pass, idle)
            elif came or self._held_taken:
                self._next_pass = loop.call_later(self.build_every, self._pass)
            else:
                self._next_pass = loop.call_later(self.linger, self._pass, True)

    def _build_slice(self) -> None:
        """Build queued records until ``slice_seconds`` have gone (one at least); hand them
        over whenever a batch is full."""
        started = time.thread_time()
        queue, held, build = self.queue, self._held, self._build
        slice_ends = time.perf_counter() + self.slice_seconds
        while queue:
            if not self._held_taken:
                self._held_since = time.monotonic()
            self._held_taken += 1
            record = build(*queue.popleft())
            if record is not None:
                held.append(record)
                self.built += 1
            if self._held_taken >= self.batch_size:
                self._hand_over_held()
                held = self._held
            if time.perf_counter() >= slice_ends:
                break
        self.cpu_seconds += time.thread_time() - started

    def _hand_over_held(self) -> None:
        # Each writer takes the list into its backlog (no per-record work).
        records, self._held, self._held_taken = self._held, [], 0
        for writer in self.writers:
            writer.offer(records)

    def render(self, items: Iterable[_Item]) -> list[AuditRecord]:
        return [record for item in items if (record := self._build(*item)) is not None]

    def _build(self, decision: "Decision", facts: "Facts | None", now: float, observed: float) -> AuditRecord | None:
        """One record (the passes build them one at a time, between their slices' clock reads);
        None only when not even the short record saying it failed could be built."""
        try:
            return self.records.build(decision, facts, now, handler_ns=max(int((observed - now) * 1e9), 0))
        except Exception as exc:  # a bug or a hostile record costs that record's details, never the audit log
            self.stats.drop("render_failed", 1)
            return self._failed(decision, facts, now, exc)

    def _failed(self, decision: "Decision", facts: "Facts | None", now: float,
                exc: Exception) -> AuditRecord | None:
        """The short record saying the decision was made and its record failed, and one
        (rate-limited) log line. Nothing here may raise: not the log handler, not an
        exception whose ``str`` fails, not a decision broken enough to fail this too."""
        try:
            self._log.warning("could not build the audit record of decision %s (%s); a short record is written "
                              "instead", getattr(decision, "decision_id", "?"), type(exc).__name__, exc_info=exc)
        except Exception:
            pass
        try:
            return self.records.build_failed(decision, facts, now, exc)
        except Exception:
            return None

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
        depth.add_metric(["decisions"], self.pending)
        built = CounterMetricFamily("authz_audit_records_built", "Audit records built")
        built.add_metric([], self.built)
        cpu = CounterMetricFamily("authz_audit_cpu_seconds", "CPU time spent building, redacting and rendering "
                                  "records (on the event loop; the sinks' own threads not included)")
        cpu.add_metric([], self.cpu_seconds)
        sink_cpu = CounterMetricFamily("authz_audit_sink_cpu_seconds", "CPU time the sinks' worker threads spent "
                                       "on their batches (encoding, compression, file and database calls)",
                                       labels=["sink"])
        for reason in ("queue_full", "render_failed", "shutdown"):
            dropped.add_metric([_ALL, reason], self.stats.dropped.get(reason, 0))
        for writer in self.writers:
            name = writer.sink.name
            written.add_metric([name], writer.stats.written)
            errors.add_metric([name], writer.stats.errors)
            for reason in ("sink_backlog", "sink_failed", "shutdown"):
                dropped.add_metric([name, reason], writer.stats.dropped.get(reason, 0))
            depth.add_metric([name], writer.depth)
            sink_cpu.add_metric([name], getattr(writer.sink, "cpu_seconds", 0.0))  # a sink of one's own may not count
        yield from (written, dropped, errors, depth, built, cpu, sink_cpu)
