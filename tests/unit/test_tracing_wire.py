"""``wire``'s two ways of framing a span give the same bytes: ``SpanLayout.pack`` (the function
written per layout, from a phase clock's times) and ``span_frame`` (parts joined, from
``phase_timeline``'s), for a root and a remote parent, with and without the decision id, with
span limits that drop the oldest events, and with a clock that went back; upb reads them back
as the span they stand for; and ``export_request`` nests the spans in their scope and resource
as it always did, in one join."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans
from opentelemetry.sdk.trace import SpanLimits

from authz_server.tracing.spans import PhaseClock, first_began, phase_timeline
from authz_server.tracing.wire import (ROOT_FLAGS, AttributesPart, EventsPart, SpanLayout, export_request, parent_fields,
                                      span_frame, varint)

SHAPE = (("identity", ()), ("cache", (("authz.cache.hit", False),)), ("policy", (("authz.explained", "full"),)),
         ("response", ()))
ATTRIBUTES = {"authz.allowed": True, "authz.code": "allowed", "authz.phase": "policy", "authz.signals": ["a", "b"]}
START = 1_700_000_000_000_000_000


def _clock(times: list[int]) -> PhaseClock:
    clock = PhaseClock(None)
    for phase, detail in (("identity", None), ("cache", False), ("policy", "full")):
        clock.mark(phase, detail)
    clock.start_ns, clock.times = START + 100, [START + at for at in times]
    return clock


@pytest.mark.parametrize("limits", [SpanLimits(), SpanLimits(max_events=2, max_span_attributes=3,
                                                              max_span_attribute_length=5)],
                         ids=["defaults", "tight"])
@pytest.mark.parametrize("parent_id", [None, bytes(range(1, 9))], ids=["root", "remote-parent"])
@pytest.mark.parametrize("error", [None, "policy_timeout"])
@pytest.mark.parametrize("times", [[12_600, 12_600, 112_350], [12_600, 9_000, 112_350]], ids=["ahead", "went-back"])
def test_a_layout_packs_the_bytes_span_frame_joins(limits: Any, parent_id: bytes | None, error: str | None,
                                                   times: list[int]) -> None:
    attributes = AttributesPart("authz.decision", ATTRIBUTES, error, limits)
    clock = _clock(times)
    start_ns, end_ns = START, START + 115_350
    shape, timings = phase_timeline(clock, ("response", ()), start_ns, end_ns)
    assert shape == SHAPE
    assert timings[1::2] == ([12.5, 0.0, 99.75, 3.0] if times[1] >= times[0] else [12.5, 0.0, 103.35, 3.0])
    events = EventsPart(SHAPE, limits)
    decision_id = attributes.id_value("0190f5d2-7c1e-7d3a-9a61-2f4c7b3e8d10")
    layout = SpanLayout.of(attributes, events, parent_id is not None, len(decision_id))
    assert layout is not None
    trace_id, span_id = bytes(range(16, 32)), bytes(range(40, 48))
    packed = layout.pack(trace_id, span_id, parent_id, start_ns, end_ns, decision_id, first_began(clock, start_ns),
                         clock.times)
    parent = ROOT_FLAGS if parent_id is None else parent_fields(parent_id, "")
    assert packed == span_frame(trace_id, span_id, parent, start_ns, end_ns, attributes.id_field(decision_id),
                                attributes, events, timings)
    span = ScopeSpans.FromString(packed).spans[0]
    assert (span.trace_id, span.span_id, span.parent_span_id) == (trace_id, span_id, parent_id or b"")
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (start_ns, end_ns)
    kept = SHAPE[events.first:]
    assert [event.name for event in span.events] == [name for name, _ in kept]
    assert [event.time_unix_nano for event in span.events] == timings[2 * events.first::2]
    assert [event.attributes[0].value.double_value for event in span.events] == timings[2 * events.first + 1::2]


def test_limits_that_drop_every_duration_leave_the_span_to_span_frame() -> None:
    limits = SpanLimits(max_event_attributes=0)
    assert SpanLayout.of(AttributesPart("authz.decision", ATTRIBUTES, None, limits), EventsPart(SHAPE, limits),
                         False, 36) is None


@pytest.mark.parametrize("count", [0, 1, 3, 300])
def test_an_export_request_nests_the_spans_in_the_scope_and_the_resource(count: int) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

    resource = ResourceSpans(resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(
        string_value="authz-server"))]), schema_url="https://example.org/schema")
    scope = ScopeSpans(scope=InstrumentationScope(name="authz_server.decision"))
    spans = [Span(trace_id=bytes([n % 256]) * 16, span_id=bytes(8), name="authz.decision" * (1 + n % 20))
             for n in range(count)]
    frames = [b"\x12" + varint(len(raw)) + raw for raw in (span.SerializeToString() for span in spans)]
    request = export_request(resource.SerializeToString(), scope.SerializeToString(), frames)
    # each message framed in its parent, the parent's fields first (as before the one join)
    spans_in_scope = scope.SerializeToString() + b"".join(frames)
    scope_in_resource = resource.SerializeToString() + b"\x12" + varint(len(spans_in_scope)) + spans_in_scope
    assert request == b"\x0a" + varint(len(scope_in_resource)) + scope_in_resource
    expected = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=resource.resource, schema_url=resource.schema_url,
        scope_spans=[ScopeSpans(scope=scope.scope, spans=spans)])])
    assert ExportTraceServiceRequest.FromString(request) == expected
