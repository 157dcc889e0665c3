"""Decisions → OpenTelemetry spans, made off the request path where that costs less.

Making a span costs microseconds of Python, more than a cached decision itself. So the request
path mostly takes timestamps: ``DecisionTracer.start`` gives the pipeline a ``PhaseClock`` that
notes when each phase ended (identity, signals, cache, policy), and ``observe`` (a pipeline
observer) appends what the sink keeps of the finished decision to a bounded queue. A thread of
this tracer turns the queue into spans with those timestamps, through a *sink*: ``otlp.OtlpSpans``
encodes them straight into OTLP requests and exports them (the default: a few µs a span; the span
of a decision the cache answered it encodes on the request path, where that costs less, and the
thread only exports it), ``sdkspans.SdkSpans`` makes them with the SDK's tracer for any other
exporter. Both make the same span: a SERVER span
named ``authz.decision`` whose parent is the trace context the request carried; its phases are
span events (``identity``, ``signals``, ``cache``, ``policy``, ``response``), each stamped when
the phase began, with its duration in ``authz.duration_us``; a phase that failed is named as the
decision's ``authz.phase`` and carries ``authz.error``. ``start``, ``observe`` and the clock, the
OTLP sink's ``keep`` and its usual span also have a C form (``_hooks.c``), which runs when built:
the Python here and in ``otlp`` is their reference.

When the queue is full a decision goes untraced and is counted (``authz_tracing_spans_dropped_total``);
it is never waited for. The thread wakes every ``delay`` seconds, or as soon as ``batch``
decisions wait, and hands the GIL back to the event loop every ``slice_spans`` spans; woken by a
batch it exports full batches only (the rest waits for the next pass), by the timer or ``flush``
everything, as the SDK's batch processor does.

Sampling is decided when a decision starts (``DecisionTracer.start``, by the sink's ``sample``:
Envoy's ``traceparent`` under the sampler's rules), since Envoy samples a few requests in a
hundred: a decision the sampler drops gets ``NOT_SAMPLED`` for a clock, which reads no time and
keeps nothing, and ``observe`` only counts it. What ``sample`` read of the request (the parent,
parsed; or, where two of the header's characters already tell the span sampled, the header
itself, which the tracer's thread parses: ``otlp.OtlpSpans.sample``) rides on the clock to
``keep``, so the header is found once. A decision made without the clock (an answer repeated by
a front, a request refused before it had facts) is sampled by ``keep`` itself, by the same rules.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from typing import Any, Iterable, Protocol


log = logging.getLogger("authz_server.tracing")

_clock_ns = time.time_ns
_LATEST_START_SKEW_NS = 60 * 1_000_000_000  # a request's `now` further from the end than this is not a wall clock

# One phase as an event: (name, its attributes after ``authz.duration_us``); and for each, flat,
# when it began (ns) and how long it took (µs).
EventShape = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
Timings = list[Any]


class PhaseClock:
    """When each phase of one decision ended (wall-clock ns), and the trace context the sampler
    kept it under (``SpanSink.sample``'s answer); made by ``DecisionTracer.start``.

    The phases marked, with their details, are ``shape``: nested tuples ``((None, p1, d1), p2, d2)``, one
    tuple a mark (as many as a list of marks made), hashable as they are; with ``times``, when each
    ended, they are all a span's events need, and the shape picks the span's encoding (``otlp``)."""

    __slots__ = ("start_ns", "times", "shape", "context")

    def __init__(self, context: Any) -> None:
        self.start_ns = _clock_ns()
        self.times: list[int] = []
        self.shape: Any = None
        self.context = context

    def mark(self, phase: str, detail: Any = None) -> None:
        """``detail``: hashable (a flag, a name)."""
        self.times.append(_clock_ns())
        self.shape = (self.shape, phase, detail)

    def phases(self) -> list[tuple[str, Any]]:
        """(phase, detail) of each mark, in order."""
        marked = []
        shape = self.shape
        while shape is not None:
            shape, phase, detail = shape
            marked.append((phase, detail))
        marked.reverse()
        return marked


class _NotSampled:
    """The clock of a decision the sampler dropped at its start: it notes nothing (one object for
    all of them; its marks cost the pipeline a call that returns, ≈0.1 µs a decision)."""

    __slots__ = ()

    def mark(self, phase: str, detail: Any = None) -> None:
        return None


NOT_SAMPLED = _NotSampled()


class SpanSink(Protocol):
    """Where the tracer's thread puts spans (``otlp.OtlpSpans``, ``sdkspans.SdkSpans``)."""

    def sample(self, facts: Any) -> Any:
        """On the request path, as a decision starts: None when the sampler drops its span, else
        what ``keep`` will want of the trace context the request carried (``PhaseClock.context``)."""

    def keep(self, decision: Any, facts: Any, now: float) -> Any:
        """On the request path: what ``add`` will need of a decision that just ended, as little
        of it as will do (holding whole decisions and requests until the thread runs costs the
        allocator more than reading them now), or the span itself where making it now costs less;
        None when the sampler drops its span (a decision without a ``PhaseClock`` is sampled here)."""

    def add(self, kept: Any) -> bool:
        """Make the span of what ``keep`` kept; False when the sampler dropped it."""

    def send(self) -> None:
        """Export what ``add`` kept and has not sent (blocking; the tracer's thread calls it)."""

    def flush(self, timeout: float) -> bool: ...

    def shutdown(self) -> None: ...


class DecisionTracer:
    """See the module docstring."""

    def __init__(self, sink: SpanSink, *, max_queue: int = 20_000, delay: float = 0.05, batch: int = 0,
                 slice_spans: int = 8) -> None:
        self.sink = sink
        self._sample, self._keep = sink.sample, sink.keep
        self._queue: collections.deque[Any] = collections.deque()
        self.max_queue = max_queue
        self.delay = delay
        self.batch = batch  # this many decisions waiting wake the thread before ``delay`` (0: never)
        self.slice_spans = slice_spans  # spans made before the thread lets the event loop run again
        self.traced = 0
        self.dropped = 0
        # Decisions the sampler dropped, counted apart by the two threads that see them (``observe`` on the
        # event loop, ``add`` on this tracer's thread): ``+=`` on one attribute from both would lose counts.
        self._unsampled_observed = self._unsampled_added = 0
        self.cpu_seconds = 0.0  # the thread's own CPU: making and exporting spans
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._passes = threading.Condition()
        self._started = self._finished = 0  # drain passes begun and done (flush waits for one begun after it)
        self._flush_asked = False  # the next pass sends a part-filled batch too (see ``_run``)
        if _hooks is not None:  # the same two hooks in C (``_hooks.c``: why, and what they cost)
            self.start = functools.partial(_hooks.start, sink.sample, getattr(sink, "samples_by_flags", False),
                                           getattr(sink, "drops_unsampled_parents", False))
            self.observe = functools.partial(_hooks.observe, self, self._keep, self._queue)
        self._thread = threading.Thread(target=self._run, name="authz-tracing", daemon=True)
        self._thread.start()

    @property
    def unsampled(self) -> int:
        """Decisions not traced because the sampler dropped them."""
        return self._unsampled_observed + self._unsampled_added

    # -- on the request path

    def start(self, facts: Any) -> PhaseClock | _NotSampled:
        context = self._sample(facts)
        return NOT_SAMPLED if context is None else PhaseClock(context)

    def observe(self, decision: Any, facts: Any, now: float) -> None:
        """The pipeline observer: one append, or a drop counted. Never blocks, never raises."""
        if decision.phase_clock is NOT_SAMPLED:
            self._unsampled_observed += 1
            return
        try:
            kept = self._keep(decision, facts, now)
        except Exception as error:  # a bug here costs one span, never the decision
            _keep_failed(error)
            return
        if kept is None:
            self._unsampled_observed += 1
            return
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(kept)
        if len(queue) == self.batch:
            self._wake.set()

    # -- the tracer's thread

    def _run(self) -> None:
        while not self._stop.is_set():
            timed_out = not self._wake.wait(self.delay)
            self._wake.clear()
            with self._passes:
                self._started += 1
                # Woken by a full batch, the sink sends full batches only and keeps the rest for
                # the next pass, as the SDK's batch processor does: a part-filled export request
                # costs the same fixed ≈0.4 ms of gRPC as a full one (this VM).
                whole = timed_out or self._flush_asked or self._stop.is_set()
                self._flush_asked = False
            began = time.thread_time()
            try:
                self._drain(whole)
            except Exception:  # an exporter's bug costs a batch, never the tracer
                log.exception("could not export spans")
            self.cpu_seconds += time.thread_time() - began
            with self._passes:
                self._finished += 1
                self._passes.notify_all()

    def _drain(self, whole: bool) -> None:
        queue, sink, add, slice_spans = self._queue, self.sink, self.sink.add, self.slice_spans
        made = traced = 0
        try:
            while queue:
                kept = queue.popleft()
                try:
                    if add(kept):
                        traced += 1
                    else:
                        self._unsampled_added += 1
                except Exception:  # a bug here costs one span, never the tracer
                    log.exception("could not trace a decision")
                made += 1
                if made % slice_spans == 0:
                    time.sleep(0)  # hand the GIL to the event loop between slices
        finally:
            self.traced += traced  # counted once a pass (this thread is the only one to count them)
        if whole:
            sink.send()

    # -- lifecycle

    def flush(self, timeout: float = 10.0) -> bool:
        """Make spans of everything observed so far and export them; True if done in time."""
        deadline = time.monotonic() + timeout
        with self._passes:
            target = self._started + 1  # a pass that begins after this call drains and sends all it saw
            self._flush_asked = True
            self._wake.set()
            if not self._passes.wait_for(lambda: self._finished >= target, timeout):
                return False
        return self.sink.flush(max(deadline - time.monotonic(), 0.0))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Trace what is queued (within ``timeout``), export it, stop. Blocking: call it off the loop."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.sink.shutdown()

    def collect(self) -> Iterable[object]:
        from prometheus_client.core import CounterMetricFamily

        traced = CounterMetricFamily("authz_tracing_spans", "Decisions traced (spans made for export)")
        traced.add_metric([], self.traced)
        dropped = CounterMetricFamily("authz_tracing_spans_dropped", "Decisions not traced: the tracer's queue "
                                      "was full")
        dropped.add_metric([], self.dropped)
        unsampled = CounterMetricFamily("authz_tracing_unsampled", "Decisions not traced: the request's "
                                        "traceparent (or the sampler) said not sampled")
        unsampled.add_metric([], self.unsampled)
        cpu = CounterMetricFamily("authz_tracing_cpu_seconds", "CPU time the tracer's thread spent making and "
                                  "exporting spans (divide by authz_tracing_spans_total: the cost per span)")
        cpu.add_metric([], self.cpu_seconds)
        yield from (traced, dropped, unsampled, cpu)


def span_start(phases: PhaseClock | None, now: float, end_ns: int) -> int:
    """When the span began (ns): the request's ``now``, unless that is a test's clock."""
    start_ns = int(now * 1e9)
    if not end_ns - _LATEST_START_SKEW_NS <= start_ns <= end_ns:
        start_ns = phases.start_ns if phases is not None else end_ns
    return start_ns


def last_phase(decision: Any, error: bool) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The event that ends the span: ``response``, or the phase that failed (with ``authz.error``),
    or ``cache`` for an answer repeated by a front (no phases of its own). ``error``: ``failed(decision)``."""
    if decision.phase_clock is None and decision.cached:  # answered again from an earlier decision (see repeats)
        return CACHE_REPEAT_EVENT
    if error or decision.verdict is None and not decision.allowed:
        return decision.phase, (("authz.error", decision.code),)
    return RESPONSE_EVENT


def event_shape(phases: PhaseClock | None, last: tuple[str, tuple[tuple[str, Any], ...]]) -> EventShape:
    """The phases as events: (name, attributes after ``authz.duration_us``) for each marked, then ``last``."""
    shape = [_event(name, detail) for name, detail in phases.phases()] if phases is not None else []
    shape.append(last)
    return tuple(shape)


def _event(name: str, detail: Any) -> tuple[str, tuple[tuple[str, Any], ...]]:
    if name == "cache":
        return _CACHE_HIT if detail else _CACHE_MISS
    if name == "policy" and detail:
        return name, (("authz.explained", str(detail)),)
    return name, ()


def first_began(phases: PhaseClock | None, start_ns: int) -> int:
    """When the first event began: the span's start, or the clock's if later."""
    return phases.start_ns if phases is not None and phases.start_ns > start_ns else start_ns


def phase_timeline(phases: PhaseClock | None, last: tuple[str, tuple[tuple[str, Any], ...]], start_ns: int,
                   end_ns: int) -> tuple[EventShape, Timings]:
    """``event_shape``, and when each event began and its µs, flat: the marked ones, then ``last``
    up to the end (``wire.SpanLayout`` works them out as this does)."""
    timings: Timings = []
    began = first_began(phases, start_ns)
    for ended in (*(phases.times if phases is not None else ()), end_ns):
        took = ended - began
        timings += (began, took / 1000 if took > 0 else 0.0)
        began = ended
    return event_shape(phases, last), timings


_CACHE_HIT = ("cache", (("authz.cache.hit", True),))
_CACHE_MISS = ("cache", (("authz.cache.hit", False),))
CACHE_REPEAT_EVENT = ("cache", (("authz.cache.hit", True), ("authz.cache.repeat", True)))
RESPONSE_EVENT = ("response", ())


def _keep_failed(error: BaseException) -> None:
    """``observe``'s word on a bug in ``keep`` (which costs that span, never the decision)."""
    log.error("could not trace a decision", exc_info=error)


try:  # the request path's hooks in C (see _hooks.c); otlp.py configures what they read of its sink
    from . import _hooks
except ImportError:  # built without a C compiler: the Python forms above run
    _hooks = None
else:
    _hooks.configure_tracer(NOT_SAMPLED, _keep_failed)
