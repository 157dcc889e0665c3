"""Spans made by the OpenTelemetry SDK's own tracer, for every exporter but OTLP alone.

``OTEL_TRACES_EXPORTER=console`` (or several exporters, a sampler or propagator or id generator
the fast path does not know, see ``otlp``) takes this path: each queued decision becomes an SDK
span (``start_span`` with the decision's timestamps, ``add_event``, ``end``) handed to the
provider's ``BatchSpanProcessor``s, so everything the SDK does (sampling, limits, batching,
exporting) applies as if the span had been made live. It costs 150-200 µs of CPU a sampled
decision (docs/observability.md), which is why OTLP alone does not come here.
"""

from __future__ import annotations

import time
from typing import Any

from .attributes import SPAN_NAME, decision_attributes, failed, parse_traceparent, trace_carrier, trace_header
from .spans import last_phase, phase_timeline, span_start

_clock_ns = time.time_ns


class SdkSpans:
    """A ``spans.SpanSink`` over an SDK ``TracerProvider`` this sink owns."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.provider = provider
        self._tracer = provider.get_tracer("authz_server.decision")
        self._propagator = propagate.get_global_textmap()
        self._fields = sorted(self._propagator.fields)
        # Decisions under an unsampled W3C parent are dropped before the queue when the sampler
        # would drop them too (parent-based, remote unsampled parent -> AlwaysOff).
        self.drops_unsampled_parents = "traceparent" in self._fields and \
            "remoteParentNotSampled:AlwaysOffSampler" in provider.sampler.get_description()
        self._server, self._error = SpanKind.SERVER, (Status, StatusCode.ERROR)

    def sample(self, facts: Any) -> bool | None:
        """None for a span the sampler drops under an unsampled W3C parent (a valid ``traceparent``:
        the propagator reads any other as none, and the span as a root); the rest is the SDK's to
        sample when ``add`` makes the span (so ``True``: no trace context kept for it)."""
        if self.drops_unsampled_parents and facts is not None:
            traceparent = trace_header(facts, "traceparent")
            parent = parse_traceparent(traceparent) if traceparent else None
            if parent is not None and not parent[2]:
                return None
        return True

    def keep(self, decision: Any, facts: Any, now: float) -> tuple[Any, Any, float, int] | None:
        if decision.phase_clock is None and self.sample(facts) is None:
            return None
        return decision, facts, now, _clock_ns()

    def add(self, kept: tuple[Any, Any, float, int]) -> bool:
        decision, facts, now, end_ns = kept
        carrier = trace_carrier(facts, self._fields)
        parent = self._propagator.extract(carrier) if carrier else None
        start_ns = span_start(decision.phase_clock, now, end_ns)
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=self._server,
                                       attributes=decision_attributes(decision, facts), start_time=start_ns)
        if span.is_recording():
            went_wrong = failed(decision)
            shape, timings = phase_timeline(decision.phase_clock, last_phase(decision, went_wrong), start_ns, end_ns)
            for (name, extra), at_ns, duration_us in zip(shape, timings[0::2], timings[1::2]):
                span.add_event(name, {"authz.duration_us": duration_us, **dict(extra)}, timestamp=at_ns)
            if went_wrong:
                status, error = self._error
                span.set_status(status(error, decision.code))
        span.end(end_time=end_ns)
        return bool(span.get_span_context().trace_flags.sampled)

    def send(self) -> None:
        """The provider's ``BatchSpanProcessor``s export on their own schedule."""

    def flush(self, timeout: float) -> bool:
        return bool(self.provider.force_flush(int(timeout * 1000)))

    def shutdown(self) -> None:
        self.provider.shutdown()
