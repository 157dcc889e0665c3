"""Decisions → OTLP export requests, with no SDK span in between: the fast path of tracing.

Making an SDK span and encoding it costs 150-200 µs of CPU per decision (the SDK's attribute
checks, span and event objects, its batch processor's queue, then its encoder building a
protobuf message field by field). This sink makes the same span as ``sdkspans.SdkSpans`` would
(tests/integration/test_tracing_paths.py compares the two as real collectors receive them) for a
few µs: it reads the parent from the request's ``traceparent`` itself, applies the sampler's
rule, draws the ids, and encodes the span with ``wire`` from parts made once per shape of
decision; every ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` spans (and what is left when the schedule
delay passes, or on a flush) one request goes out through the SDK's own OTLP exporter (``transport``).

What the SDK would decide is decided the same way: the resource and instrumentation scope are
encoded by the SDK's encoder once; span limits are the SDK's ``SpanLimits`` applied per shape
(``wire``); the sampler is the one ``OTEL_TRACES_SAMPLER[_ARG]`` gives the SDK, read as a rule
(always on, always off, trace-id ratio, or parent-based over those); ``OTEL_BSP_SCHEDULE_DELAY``,
``_MAX_QUEUE_SIZE`` and ``_MAX_EXPORT_BATCH_SIZE`` set the tracer's wake-up, queue and batch.
Only OTLP alone takes this path, and only with the SDK's built-in samplers, the random id
generator and the W3C propagators (``tracecontext``, ``baggage``: the default); anything else
(``console``, several exporters, a custom sampler, B3...) is served by ``sdkspans`` at its cost.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from typing import Any, Mapping

from ..audit.record import who
from .attributes import (FAILED_CODES, FAILED_PHASES, METHODS, SPAN_NAME, STANDARD_METHODS, UNSAMPLED_DIGITS,
                         attribute_shape, failed, parse_traceparent, shape_attributes, trace_header_in)
from .spans import (CACHE_REPEAT_EVENT, RESPONSE_EVENT, DecisionTracer, PhaseClock, _hooks, event_shape, first_began,
                    last_phase, phase_timeline, span_start)
from .transport import EncodedSpans, encoded_exporter
from .wire import ROOT_FLAGS, AttributesPart, EventsPart, SpanLayout, export_request, parent_fields, span_frame

log = logging.getLogger("authz_server.tracing")
if _hooks is not None:  # what the C forms of ``keep`` and of the sampler's usual answers read
    _hooks.configure_sink(FAILED_PHASES, FAILED_CODES, STANDARD_METHODS, METHODS, RESPONSE_EVENT,
                          CACHE_REPEAT_EVENT, who, UNSAMPLED_DIGITS)

_RATIO_MASK = (1 << 64) - 1  # TraceIdRatioBased.TRACE_ID_LIMIT: the ratio reads the low 64 bits
_clock_ns = time.time_ns
_getrandbits = random.getrandbits  # as the SDK's RandomIdGenerator draws ids
_MAX_SHAPES = 10_000  # attribute shapes kept encoded (subjects x outcomes); all forgotten at once past it
_NO_HEADER: tuple[None, dict[str, str]] = (None, {})  # what ``trace_header_in`` would say of no request
_UNSEEN = object()  # a span shape without its layout yet (None: it has none)
_BSP_DEFAULTS = {"OTEL_BSP_SCHEDULE_DELAY": 5000, "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
                 "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512}

Rule = Any  # True, False, or a trace-id ratio's bound (int): see ``_rule``
# A sampled span's trace context (``OtlpSpans.sample``): its trace id, its parent's span id (None:
# a root), and the ``traceparent`` and ``tracestate`` the trace state is read from (None: none).
# A trace id of None: the ``traceparent`` is still to be read (``OtlpSpans.sample``), the span sampled.
TraceContext = tuple[bytes | None, bytes | None, str | None, str | None]


def otlp_tracer(protocol: str, resource: Any, environ: Mapping[str, str]) -> DecisionTracer | None:
    """A tracer on this path, or None when the environment asks for what only the SDK does."""
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    propagators = {name.strip().lower() for name in environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")}
    provider = TracerProvider(resource=resource)  # reads the sampler and id generator as the SDK path would
    rules = sampler_rules(provider.sampler)
    if rules is None or type(provider.id_generator) is not RandomIdGenerator or \
            "tracecontext" not in propagators or not propagators <= {"tracecontext", "baggage"}:
        return None
    delay, max_queue, batch = (_bsp(environ, name) for name in _BSP_DEFAULTS)
    if batch > max_queue:
        batch = max_queue
    sink = OtlpSpans(encoded_exporter(protocol), resource, rules, SpanLimits(), batch=batch)
    # 64 spans ≈ 0.3 ms of the GIL at a time, as the SDK path's slices of 8 spans hold it
    return DecisionTracer(sink, max_queue=max_queue, delay=delay / 1000, batch=batch, slice_spans=64)


def _bsp(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name, "").strip()
    try:
        value = int(raw) if raw else _BSP_DEFAULTS[name]
    except ValueError:
        value = -1
    if value <= 0:  # as the SDK: a value it cannot use is its default, with a warning
        log.warning("%s=%r is not a positive integer: using %d", name, raw, _BSP_DEFAULTS[name])
        value = _BSP_DEFAULTS[name]
    return value


def sampler_rules(sampler: Any) -> tuple[Rule, Rule, Rule] | None:
    """(root, remote parent sampled, remote parent not sampled) rules of one of the SDK's built-in
    samplers; None for any other (a sampler that may read attributes or change the trace state)."""
    from opentelemetry.sdk.trace.sampling import ParentBased

    if isinstance(sampler, ParentBased) and type(sampler).should_sample is ParentBased.should_sample:
        delegates = [getattr(sampler, name, None) for name in
                     ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled")]
        rules = [_rule(delegate) for delegate in delegates]
        if any(rule is None for rule in rules):
            return None
        return rules[0], rules[1], rules[2]
    rule = _rule(sampler)
    return None if rule is None else (rule, rule, rule)


def _rule(sampler: Any) -> Rule | None:
    from opentelemetry.sdk.trace.sampling import Decision, StaticSampler, TraceIdRatioBased

    if isinstance(sampler, StaticSampler) and type(sampler).should_sample is StaticSampler.should_sample:
        # the same whatever is asked; RECORD_ONLY is not sampled (not exported)
        return sampler.should_sample(None, 1, SPAN_NAME).decision is Decision.RECORD_AND_SAMPLE
    if isinstance(sampler, TraceIdRatioBased) and type(sampler).should_sample is TraceIdRatioBased.should_sample:
        return int(sampler.bound)
    return None


class OtlpSpans:
    """A ``spans.SpanSink`` encoding spans for an OTLP exporter (see the module docstring)."""

    def __init__(self, exporter: Any, resource: Any, rules: tuple[Rule, Rule, Rule], limits: Any, *,
                 batch: int = 512) -> None:
        self.exporter = exporter
        self._root, self._sampled_parent, self._unsampled_parent = rules
        # Whether a span is sampled whatever its ``traceparent`` says, but for a valid one whose sampled
        # flag is clear (the default, parent-based always-on, and always-on): then ``sample`` can tell
        # most spans sampled from two characters, and ``_span`` reads the parent (off the request path
        # but for a decision the cache answered: see ``keep``).
        self.samples_by_flags = self._root is True and self._sampled_parent is True
        # Whether a valid ``traceparent`` whose sampled flag is clear is dropped (the default's rule for it).
        self.drops_unsampled_parents = self._unsampled_parent is False
        self._limits = limits
        self.batch = batch
        self._resource_spans, self._scope_spans = _resource_and_scope(resource)
        self._attributes: dict[Any, AttributesPart] = {}
        self._events: dict[Any, EventsPart] = {}
        self._layouts: dict[tuple[Any, ...], SpanLayout | None] = {}  # by span shape: see ``_span``
        self._frames: list[bytes] = []
        self.exported = self.failed = 0  # spans the collector acknowledged, spans lost to a failed export
        # What ``keep`` kept, made a span: by ``_span``, or when built in C (``_hooks.span``: the usual
        # span, anything else handed to ``_span``); ``keep`` in C too
        self._make = self._span
        if _hooks is not None:
            self._make = functools.partial(_hooks.span, self._layouts, _getrandbits, self._span)
            self.keep = functools.partial(_hooks.keep, self._layouts, self.sample, self._make, _clock_ns)

    def sample(self, facts: Any) -> TraceContext | None:
        """The sampler's answer for a request (``facts``; None: a request refused unread): the
        parent its ``traceparent`` names, if valid, under the rule for a sampled or unsampled
        parent, else (none, or not valid: as the SDK's propagator) a new trace id under the rule
        for roots. Where the rules sample every span but those of a valid unsampled parent, a
        ``traceparent`` that cannot be one is not read here: the context then holds it unread
        (a trace id of None), for ``_span``."""
        traceparent, headers = trace_header_in(facts, "traceparent") if facts is not None else _NO_HEADER
        if traceparent and self.samples_by_flags and \
                traceparent[54:55] not in UNSAMPLED_DIGITS and traceparent[2:3] == "-":
            # A "-" third: the grammar puts the flags at 53-54 if it matches at all, and the second
            # digit is not that of a clear sampled bit; so sampled, as a child or (not valid) a root.
            # Read by ``_span``, on the tracer's thread once a policy evaluated the request: parsing it
            # here, after another's evaluation (whose engine has left the CPU's caches cold), cost the
            # request path 2.7 µs.
            return None, None, traceparent, headers.get("tracestate")
        return self._context(traceparent, headers)

    def _read(self, context: TraceContext) -> TraceContext:
        """A context ``sample`` left with its ``traceparent`` unread, read by the same rules."""
        _, _, traceparent, tracestate = context
        read = self._context(traceparent, {"tracestate": tracestate} if tracestate else _NO_HEADER[1])
        assert read is not None  # sampled whatever the traceparent holds (``sample``)
        return read

    def _context(self, traceparent: str | None, headers: Mapping[str, str]) -> TraceContext | None:
        """``sample``'s answer with the ``traceparent`` read (``headers``: where its ``tracestate`` is)."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is None:
            rule = self._root
            if rule is False:
                return None
            trace_number = _getrandbits(128) or 1
            if rule is not True and not _sampled(rule, trace_number):
                return None
            return trace_number.to_bytes(16, "big"), None, None, None
        trace_id, parent_id, sampled = parent
        rule = self._sampled_parent if sampled else self._unsampled_parent
        if rule is False or rule is not True and not _sampled(rule, int.from_bytes(trace_id, "big")):
            return None
        tracestate = headers.get("tracestate")
        return trace_id, parent_id, traceparent if tracestate else None, tracestate

    def keep(self, decision: Any, facts: Any, now: float) -> tuple[Any, ...] | bytes | None:
        """The span's layout (or its shape, while it has none: see ``_span``), and what the span's
        changing fields are made of. The shape is looked up here, while the tuples it is made of are
        fresh in the CPU's caches and die young: the thread, a batch later, read them all again from
        memory (0.6 µs a span more in the benchmark's runs than the lookup here). A span whose
        parent is unread yet (``sample``) is laid out by ``_span``, which reads it.

        The span of a decision the cache answered is made here, whole (the framed span's bytes):
        no policy evaluation ran, so the request path's caches are warm and making it costs less
        than the thread pays a batch later, reading all of it again, cold (4 µs less a cached
        decision in all, measured in one process against the thread making it: docs/benchmarks.md).
        After an evaluation the caches are cold, and the thread makes the span."""
        end_ns = _clock_ns()
        phases = decision.phase_clock
        context = phases.context if phases is not None else self.sample(facts)
        if context is None:
            return None
        error = failed(decision)
        decision_id = decision.decision_id
        shape = ((attribute_shape(decision, facts), decision.code if error else None), last_phase(decision, error),
                 phases.shape if phases is not None else None, context[1] is None, len(decision_id))
        # a trace state, or an id whose length in bytes is not its length: the general way (``_span``)
        laid_out = context[2] is None and decision_id.isascii()
        kept = self._layouts.get(shape) or shape if laid_out else shape, decision_id, phases, context, now, end_ns
        return self._span(kept) if decision.cached else kept

    def add(self, kept: tuple[Any, ...] | bytes) -> bool:
        self._frames.append(kept if isinstance(kept, bytes) else self._make(kept))
        if len(self._frames) >= self.batch:
            self.send()
        return True

    def _span(self, kept: tuple[Any, ...]) -> bytes:
        """What ``keep`` kept, made a span (framed, as ``ScopeSpans.spans`` holds it). Run by either
        thread: the parts and layouts it makes once per shape are dicts, each get and set whole."""
        spanning, decision_id, phases, context, now, end_ns = kept
        unread = context[0] is None
        trace_id, parent_id, traceparent, tracestate = self._read(context) if unread else context
        if unread:
            key, last, marked, _, id_length = spanning  # an unread parent is laid out here (``keep``)
            spanning = (key, last, marked, parent_id is None, id_length)
        span_id = (_getrandbits(64) or 1).to_bytes(8, "big")
        start_ns = span_start(phases, now, end_ns)
        layout: SpanLayout | None = None
        if spanning.__class__ is not tuple:  # the usual span: its layout
            layout = spanning
        elif traceparent is None and decision_id.isascii():  # a shape without its layout yet, or with none
            found: Any = self._layouts.get(spanning, _UNSEEN)
            layout = self._layout(spanning, phases) if found is _UNSEEN else found
        if layout is not None:
            frame = layout.pack(trace_id, span_id, parent_id, start_ns, end_ns, decision_id.encode(),
                                first_began(phases, start_ns), phases.times if phases is not None else ())
        else:  # a trace state, limits that cut the decision id or dropped an event's duration: the general way
            key, last = spanning[0], spanning[1]
            frame = self._frame(decision_id, key, last, phases, trace_id, span_id, parent_id,
                                _trace_state(traceparent, tracestate) if traceparent else "", start_ns, end_ns)
        return frame

    def _layout(self, shape: tuple[Any, ...], phases: PhaseClock | None) -> SpanLayout | None:
        """The layout of spans of one ``shape`` (see ``_span``; made once), None when there is none."""
        if len(self._layouts) >= _MAX_SHAPES:
            self._layouts.clear()
        key, last, _, root, id_length = shape
        attributes = self._attributes_part(key)
        # the ids laid out are ASCII (``keep``), as many bytes as characters: none is cut within the limit
        uncut = attributes.id_length is None or id_length <= attributes.id_length
        layout = self._layouts[shape] = SpanLayout.of(attributes, self._events_part(event_shape(phases, last)),
                                                      not root, id_length) if uncut else None
        return layout

    def _frame(self, decision_id: str, key: Any, last: Any, phases: PhaseClock | None, trace_id: bytes,
               span_id: bytes, parent_id: bytes | None, trace_state: str, start_ns: int, end_ns: int) -> bytes:
        """A span of any shape, from its parts joined (``wire.span_frame``)."""
        event_shape, timings = phase_timeline(phases, last, start_ns, end_ns)
        attributes = self._attributes_part(key)
        parent_part = ROOT_FLAGS if parent_id is None else parent_fields(parent_id, trace_state)
        return span_frame(trace_id, span_id, parent_part, start_ns, end_ns,
                          attributes.id_field(attributes.id_value(decision_id)), attributes,
                          self._events_part(event_shape), timings)

    def _attributes_part(self, key: Any) -> AttributesPart:
        part = self._attributes.get(key)
        if part is None:
            if len(self._attributes) >= _MAX_SHAPES:
                self._attributes.clear()
            shape, error = key
            part = self._attributes[key] = AttributesPart(SPAN_NAME, shape_attributes(shape), error, self._limits)
        return part

    def _events_part(self, shape: Any) -> EventsPart:
        part = self._events.get(shape)
        if part is None:
            if len(self._events) >= _MAX_SHAPES:
                self._events.clear()
            part = self._events[shape] = EventsPart(shape, self._limits)
        return part

    def send(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        frames, self._frames = self._frames, []
        if not frames:
            return
        request = export_request(self._resource_spans, self._scope_spans, frames)
        if self.exporter.export(EncodedSpans(request, len(frames))) is SpanExportResult.SUCCESS:
            self.exported += len(frames)
        else:  # the exporter logged why, after its retries
            self.failed += len(frames)

    def flush(self, timeout: float) -> bool:
        """Everything added was sent by the tracer's flushing pass."""
        return not self._frames

    def shutdown(self) -> None:
        self.exporter.shutdown()


def _sampled(rule: Rule, trace_id: int) -> bool:
    if rule is True or rule is False:
        return bool(rule)
    return bool(trace_id & _RATIO_MASK < rule)


def _trace_state(traceparent: str, tracestate: str) -> str:
    """The parent's trace state as the SDK's encoder writes it (read by the SDK's propagator)."""
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent, "tracestate": tracestate})
    state = get_current_span(context).get_span_context().trace_state
    return ",".join(f"{key}={value}" for key, value in state.items()) if state else ""


def _resource_and_scope(resource: Any) -> tuple[bytes, bytes]:
    """``ResourceSpans`` and ``ScopeSpans`` without their spans, as the SDK's encoder writes them
    for this resource and the tracer ``sdkspans`` uses."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    span: Any = TracerProvider(resource=resource, sampler=ALWAYS_ON).get_tracer("authz_server.decision").start_span(
        SPAN_NAME)
    span.end()
    resource_spans = encode_spans([span]).resource_spans[0]
    scope_spans = resource_spans.scope_spans[0]
    del scope_spans.spans[:]
    scope = scope_spans.SerializeToString()
    del resource_spans.scope_spans[:]
    return resource_spans.SerializeToString(), scope
