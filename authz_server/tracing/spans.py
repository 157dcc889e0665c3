"""Decisions → OpenTelemetry spans, made off the request path.

Making an SDK span costs tens of microseconds of Python (ids, sampling, attribute checks, the
processor's queue), more than a cached decision itself. So the request path only takes
timestamps: ``DecisionTracer.start`` gives the pipeline a ``PhaseClock`` that notes when each
phase ended (identity, signals, cache, policy), and ``observe`` (a pipeline observer) appends
the finished decision to a bounded queue. A thread of this tracer turns the queue into spans
through the SDK with those timestamps (``start_time``, event timestamps, ``end_time``): the
same spans, sampled, limited, batched and exported by the SDK as if they had been made live,
at a fraction of the cost where it matters. Each span is a SERVER span named
``authz.decision`` whose parent is the trace context the request carried; its phases are
span events (``identity``, ``signals``, ``cache``, ``policy``, ``response``), each stamped
when the phase began, with its duration in ``authz.duration_us``; a phase that failed is named
as the decision's ``authz.phase`` and carries ``authz.error``. When the queue is full a
decision goes untraced and is counted (``authz_tracing_spans_dropped_total``); it is never
waited for.

Envoy samples: a ``traceparent`` whose sampled flag is off, under the SDK's parent-based sampler
(the default: it drops such spans), never reaches the queue: ``observe`` reads the flag and
stops there, so an unsampled decision costs about a microsecond, not a span the SDK would make
only to drop it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Iterable

from .attributes import SPAN_NAME, decision_attributes, failed, trace_carrier

log = logging.getLogger("authz_server.tracing")

_clock_ns = time.time_ns
_LATEST_START_SKEW_NS = 60 * 1_000_000_000  # a request's `now` further from the end than this is not a wall clock


class PhaseClock:
    """When each phase of one decision ended (wall-clock ns); made by ``DecisionTracer.start``."""

    __slots__ = ("start_ns", "marks")

    def __init__(self) -> None:
        self.start_ns = _clock_ns()
        self.marks: list[tuple[str, int, Any]] = []

    def mark(self, phase: str, detail: Any = None) -> None:
        self.marks.append((phase, _clock_ns(), detail))


class DecisionTracer:
    """See the module docstring. ``provider`` is an SDK ``TracerProvider`` this tracer owns."""

    def __init__(self, provider: Any, *, max_queue: int = 20_000, linger: float = 0.05, slice_spans: int = 8) -> None:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.provider = provider
        self._tracer = provider.get_tracer("authz_server.decision")
        self._propagator = propagate.get_global_textmap()
        self._fields = sorted(self._propagator.fields)
        # Decisions under an unsampled W3C parent are dropped before the queue when the sampler
        # would drop them too (parent-based, remote unsampled parent -> AlwaysOff).
        self._drop_unsampled = "traceparent" in self._fields and \
            "remoteParentNotSampled:AlwaysOffSampler" in provider.sampler.get_description()
        self.unsampled = 0
        self._server, self._error = SpanKind.SERVER, (Status, StatusCode.ERROR)
        self._queue: collections.deque[tuple[Any, Any, float, int]] = collections.deque()
        self.max_queue = max_queue
        self.linger = linger
        self.slice_spans = slice_spans  # spans made before the thread lets the event loop run again
        self.traced = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by flush and shutdown: drain now, not at the next linger
        self._idle = threading.Event()  # clear while a span is being made
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="authz-tracing", daemon=True)
        self._thread.start()

    # -- on the request path

    def start(self) -> PhaseClock:
        return PhaseClock()

    def observe(self, decision: Any, facts: Any, now: float) -> None:
        """The pipeline observer: one append, or a drop counted. Never blocks."""
        if self._drop_unsampled and facts is not None and _unsampled(facts):
            self.unsampled += 1
            return
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append((decision, facts, now, _clock_ns()))

    # -- the tracer's thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.linger)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        queue = self._queue
        made = 0
        while queue:
            self._idle.clear()
            decision, facts, now, end_ns = queue.popleft()
            try:
                self._span(decision, facts, now, end_ns)
                self.traced += 1
            except Exception:  # a bug here costs one span, never the tracer
                log.exception("could not trace decision %s", getattr(decision, "decision_id", "?"))
            made += 1
            if made % self.slice_spans == 0:
                time.sleep(0)  # hand the GIL to the event loop between slices
        self._idle.set()

    def _span(self, decision: Any, facts: Any, now: float, end_ns: int) -> None:
        carrier = trace_carrier(facts, self._fields)
        parent = self._propagator.extract(carrier) if carrier else None
        phases: PhaseClock | None = decision.phase_clock
        start_ns = int(now * 1e9)
        if not end_ns - _LATEST_START_SKEW_NS <= start_ns <= end_ns:  # `now` from a test's clock
            start_ns = phases.start_ns if phases is not None else end_ns
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=self._server,
                                       attributes=decision_attributes(decision, facts), start_time=start_ns)
        if span.is_recording():
            for name, at_ns, attributes in _phase_events(decision, phases, start_ns, end_ns):
                span.add_event(name, attributes, timestamp=at_ns)
            if failed(decision):
                status, error = self._error
                span.set_status(status(error, decision.code))
        span.end(end_time=end_ns)

    # -- lifecycle

    def flush(self, timeout: float = 10.0) -> bool:
        """Make spans of everything observed so far and export them; True if done in time."""
        deadline = time.monotonic() + timeout
        while (self._queue or not self._idle.is_set()) and time.monotonic() < deadline:
            self._wake.set()
            self._idle.wait(0.01)
        if self._queue or not self._idle.is_set():
            return False
        return bool(self.provider.force_flush(int(max(deadline - time.monotonic(), 0.0) * 1000)))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Trace what is queued (within ``timeout``), export it, stop. Blocking: call it off the loop."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.provider.shutdown()

    def collect(self) -> Iterable[object]:
        from prometheus_client.core import CounterMetricFamily

        traced = CounterMetricFamily("authz_tracing_spans", "Decisions traced (spans handed to the OpenTelemetry SDK)")
        traced.add_metric([], self.traced)
        dropped = CounterMetricFamily("authz_tracing_spans_dropped", "Decisions not traced: the tracer's queue "
                                      "was full")
        dropped.add_metric([], self.dropped)
        unsampled = CounterMetricFamily("authz_tracing_unsampled", "Decisions not traced: the request's "
                                        "traceparent said not sampled")
        unsampled.add_metric([], self.unsampled)
        yield from (traced, dropped, unsampled)


def _unsampled(facts: Any) -> bool:
    """The request's W3C ``traceparent`` says not sampled (a malformed one is the SDK's to judge)."""
    parent = facts.headers.get("traceparent")
    if parent is None and facts.transport == "grpc":  # kept apart from the headers there (facts.Volatile)
        volatile = getattr(facts.attributes_factory, "volatile", None)
        parent = volatile.headers.get("traceparent") if volatile is not None else None
    if parent is None or len(parent) < 55 or parent[2] != "-" or parent[52] != "-":
        return False
    flags = parent[53:55]
    return flags in _UNSAMPLED_FLAGS


# The sampled bit is the lowest of the flags byte (W3C trace context, version 00 and later).
_UNSAMPLED_FLAGS = frozenset(f"{n:02x}" for n in range(0, 256, 2))  # lowercase: W3C rejects other forms


def _phase_events(decision: Any, phases: PhaseClock | None, start_ns: int,
                  end_ns: int) -> Iterable[tuple[str, int, dict[str, Any]]]:
    """(name, when it began, attributes) for each phase: the marked ones, then the last one
    (``response``, or the phase that failed) up to the end."""
    began = max(start_ns, phases.start_ns) if phases is not None else start_ns
    for name, ended, detail in phases.marks if phases is not None else ():
        attributes: dict[str, Any] = {"authz.duration_us": max(ended - began, 0) / 1000}
        if name == "cache":
            attributes["authz.cache.hit"] = bool(detail)
        elif name == "policy" and detail:
            attributes["authz.explained"] = str(detail)
        yield name, began, attributes
        began = ended
    last: dict[str, Any] = {"authz.duration_us": max(end_ns - began, 0) / 1000}
    if phases is None and decision.cached:  # answered again from an earlier decision (see repeats)
        yield "cache", began, {**last, "authz.cache.hit": True, "authz.cache.repeat": True}
    elif decision.verdict is None and not decision.allowed or failed(decision):
        yield decision.phase, began, {**last, "authz.error": decision.code}
    else:
        yield "response", began, last
