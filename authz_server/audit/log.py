"""The decision audit log: a pipeline observer, a bounded queue, a worker thread, the writers.

On the request path ``observe`` appends what it was given (the decision, its facts, the
time) to a bounded queue; when the queue is full the record is dropped and counted, so a
decision never waits for the audit log.

Everything else happens where it delays no answer. The audit log's own thread builds each
record (the input document too, for cache hits), redacts it (the one choke point: nothing
reaches a sink unredacted) and renders its JSON line once, for every sink (see ``record.py``).
It builds what is queued every ``build_every`` seconds (5 ms), in slices of ``slice_seconds``
(0.5 ms: a few dozen records of a repeated request, a few of new ones) with a 50 µs sleep
between slices (the GIL is the event loop's then), so the event loop waits for it at most one
slice whatever the batch size. Building often keeps each wait short, not only bounded: a
request that arrives while the thread holds the GIL waits for the rest of its work, and 50 ms
of a single connection's decisions (≈ 70) took two full slices, a 5 ms batch (≈ 7) a fifth of
one. Before, the dispatcher built a whole batch on the event loop, 25 ms at a time at 2,600
decisions a second, and that was the tail of every answer behind it.

Built records are held until the oldest has waited ``linger`` seconds (50 ms) or a batch is
full, then go to every sink's writer (``writer.py``) on the event loop, which only moves the
list (a sink's write costs about the same for one record as for hundreds, and each hand-over
wakes the event loop): the sinks write from threads of their own. A record that cannot be
built is counted (``render_failed``) and replaced by a short one saying so
(``RecordBuilder.build_failed``); it never ends the thread. ``stop`` flushes what is queued,
within a time bound, and counts whatever it could not write.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
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
_HAND_OVER = 50e-6  # seconds the thread sleeps between slices: the event loop's turn, if it wants one


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
        self.slice_seconds = slice_seconds  # building before the thread lets the event loop in
        self.flush_timeout = flush_timeout
        self.stats = WriterStats()  # before the fan-out: queue_full, render_failed, shutdown
        self.built = 0  # records the thread built (short ones included)
        self.cpu_seconds = 0.0  # CPU the thread spent on them: the audit log's cost, measured where it is paid
        self._clock = clock
        self._closed = False
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # a full batch is waiting, or stop: hand over without lingering
        self._halt = threading.Event()
        self._held: list[AuditRecord] = []  # built, waiting for the linger (the thread's alone)
        self._held_taken = 0  # decisions taken from the queue for them (a failed build holds no record)
        self._held_since = 0.0  # monotonic time the oldest of them was built
        # Records taken from the queue by the thread, and offered to the writers by the loop (or
        # failed): each counter has one writer, so neither needs a lock.
        self._taken = 0
        self._offered = 0
        self._log = RateLimitedLog(log)

    @classmethod
    def from_specs(cls, specs: Iterable[str], **options: Any) -> "AuditLog":
        return cls([open_sink(spec) for spec in specs], **options)

    @property
    def pending(self) -> int:
        """Decisions observed and not yet handed to the writers."""
        return len(self.queue) + self._taken - self._offered

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
        if len(queue) == self.batch_size:
            self._wake.set()

    # -- the writer side
    def start(self) -> None:
        for writer in self.writers:
            writer.start()
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="authz-audit", daemon=True)
            self._thread.start()

    async def drain(self) -> None:
        """Return once everything observed so far has been written (or dropped)."""
        while True:
            while self.pending:
                self._wake.set()
                await asyncio.sleep(0.002)
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
        if self._thread is None:  # never started: the queue is written from here
            self._loop = loop
            await asyncio.to_thread(self._drain_until, time.monotonic() + self.flush_timeout
                                    if timeout is None else time.monotonic() + timeout)
        else:
            while self.pending and loop.time() < deadline:
                self._wake.set()
                await asyncio.sleep(0.002)
            self._halt.set()
            self._wake.set()
            await asyncio.to_thread(self._thread.join, max(deadline - loop.time(), 0.0) + 1.0)
            self._thread = None
        await asyncio.sleep(0)  # let the last batches the thread offered reach the writers
        left = len(self.queue)
        self.queue.clear()
        self.stats.drop("shutdown", left)
        await asyncio.gather(*(writer.close(max(deadline - loop.time(), 0.0)) for writer in self.writers))

    # -- the audit log's thread
    def _run(self) -> None:
        while not self._halt.is_set():
            # Idle (nothing queued, nothing held), the thread waits out a whole linger, not 200
            # wake-ups a second; what came meanwhile has lingered enough and goes with this pass.
            idle = not self.queue and not self._held_taken
            woken = self._wake.wait(self.linger if idle else self.build_every)
            self._wake.clear()
            started = time.thread_time()
            self._drain_until(None, hand_over=woken or idle)
            self.cpu_seconds += time.thread_time() - started

    def _drain_until(self, deadline: float | None, *, hand_over: bool = True) -> None:
        """Build every queued record (until ``deadline``, monotonic, if given); hand the built
        ones over by full batches, and the rest now if ``hand_over`` or once they have lingered."""
        queue = self.queue
        while queue:
            if deadline is not None and time.monotonic() >= deadline:
                break
            held = self._held
            before = len(held)
            count = min(self.batch_size - self._held_taken, len(queue))
            self._taken += count  # before they leave the queue: drain() never sees them nowhere
            items = [queue.popleft() for _ in range(count)]
            if not self._held_taken:
                self._held_since = time.monotonic()
            self._held_taken += count
            build = self._build
            slice_ends = time.perf_counter() + self.slice_seconds
            for item in items:
                record = build(*item)
                if record is not None:
                    held.append(record)
                if time.perf_counter() >= slice_ends:
                    # Hand the GIL to the event loop if it waits for it. sleep(0) is not enough:
                    # this thread takes the GIL straight back before the waiting one wakes, and
                    # the waiter's 5 ms switch interval starts over. A real sleep lets it in.
                    time.sleep(_HAND_OVER)
                    slice_ends = time.perf_counter() + self.slice_seconds
            self.built += len(held) - before
            if self._held_taken >= self.batch_size:
                self._hand_over_held()
        if self._held_taken and (hand_over or time.monotonic() - self._held_since >= self.linger):
            self._hand_over_held()

    def _hand_over_held(self) -> None:
        records, taken = self._held, self._held_taken
        self._held, self._held_taken = [], 0
        self._hand_over(records, taken)

    def _hand_over(self, records: list[AuditRecord], taken: int) -> None:
        loop = self._loop
        try:
            if loop is None or loop.is_closed():
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._fan_out, records, taken)
        except RuntimeError:  # the loop closed under us (a test's loop, an interpreter exit)
            self.stats.drop("shutdown", len(records))

    def _fan_out(self, records: list[AuditRecord], taken: int) -> None:
        # On the event loop: each writer takes the list into its backlog (no per-record work).
        for writer in self.writers:
            writer.offer(records)
        self._offered += taken

    def render(self, items: Iterable[_Item]) -> list[AuditRecord]:
        return [record for item in items if (record := self._build(*item)) is not None]

    def _build(self, decision: "Decision", facts: "Facts | None", now: float, observed: float) -> AuditRecord | None:
        """One record (the thread builds them one at a time, between its slices' clock reads);
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
        built = CounterMetricFamily("authz_audit_records_built", "Audit records the audit thread built")
        built.add_metric([], self.built)
        cpu = CounterMetricFamily("authz_audit_cpu_seconds", "CPU time the audit thread spent building, redacting "
                                  "and rendering records (the sinks' own threads not included)")
        cpu.add_metric([], self.cpu_seconds)
        for reason in ("queue_full", "render_failed", "shutdown"):
            dropped.add_metric([_ALL, reason], self.stats.dropped.get(reason, 0))
        for writer in self.writers:
            name = writer.sink.name
            written.add_metric([name], writer.stats.written)
            errors.add_metric([name], writer.stats.errors)
            for reason in ("sink_backlog", "sink_failed", "shutdown"):
                dropped.add_metric([name, reason], writer.stats.dropped.get(reason, 0))
            depth.add_metric([name], writer.depth)
        yield from (written, dropped, errors, depth, built, cpu)
