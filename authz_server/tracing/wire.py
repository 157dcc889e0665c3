"""A decision's span as OTLP protobuf bytes, from parts encoded once per shape.

Why bytes by hand: with the C protobuf (upb) a ``Span`` message costs 9-12 µs of Python to
build (each attribute, event and field is a call of its own, ~0.3 µs each; measured on this
2-core machine with a 13-attribute, 4-event span, template spans merged from bytes included):
the whole budget of a traced decision (≤ 10 µs). But what changes from one decision's span to
the next is little and of fixed width: the ids, the start and end, each event's start and
duration, the decision id. So everything else (name, kind, the other attributes, the events'
names and attributes, status, what span limits dropped) is encoded *by upb* once per shape
(``AttributesPart``, ``EventsPart``), and a span is those bytes with the changing fields put in
front: only field tags, varint lengths, little-endian fixed64/double numbers and one string
``KeyValue`` are written here (``span_frame``, ``export_request``). ``SpanLayout`` makes the usual
span (no trace state) with one ``struct`` call whose constant fields are those parts. Protobuf parsers take fields
in any order and concatenate repeated ones, so the decision id comes first among the attributes
and the duration first among an event's, as the SDK's encoder has them.
tests/unit/test_tracing_wire.py parses these bytes with upb and compares them with the SDK's.

The limits are the SDK's own classes applied to the shape (``BoundedAttributes``: the oldest
attribute evicted first, values truncated; the oldest events dropped), so a span here is cut as
the SDK would cut it.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Sequence

_TIMES = struct.Struct("<BQBQ")  # start_time_unix_nano (7) and end_time_unix_nano (8), fixed64
_KEY_DECISION_ID = "authz.decision_id"
_KEY_DURATION = "authz.duration_us"
# Span field tags (opentelemetry/proto/trace/v1/trace.proto)
_TRACE_ID, _SPAN_ID, _TRACE_STATE, _PARENT_ID = b"\x0a\x10", b"\x12\x08", b"\x1a", b"\x22\x08"
_ATTRIBUTE, _EVENT, _FLAGS = b"\x4a", b"\x5a", b"\x85\x01"  # 9 (KeyValue), 11 (Event), 16 (fixed32)
_SPAN = b"\x12"  # ScopeSpans.spans, and ResourceSpans.scope_spans
_RESOURCE_SPANS = b"\x0a"  # ExportTraceServiceRequest.resource_spans
# SpanFlags: the SDK's encoder says whether the parent was remote (it always knows).
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
ROOT_FLAGS = _FLAGS + struct.pack("<I", _HAS_IS_REMOTE)
REMOTE_PARENT_FLAGS = _FLAGS + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)


def varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + varint(len(payload)) + payload


def parent_fields(parent_id: bytes, trace_state: str) -> bytes:
    """The fields of a span whose parent came from another process: trace state, parent, flags."""
    state = field(_TRACE_STATE, trace_state.encode()) if trace_state else b""
    return state + _PARENT_ID + parent_id + REMOTE_PARENT_FLAGS


def any_value(value: Any) -> Any:
    """An ``AnyValue`` as the SDK's encoder makes it, for the values its attribute cleaning keeps."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue

    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    raise TypeError(f"no OTLP value for {type(value).__name__}")


def _key_values(attributes: Any) -> list[Any]:
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    return [KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


class AttributesPart:
    """Name, kind, status and every attribute but the decision id of one shape of span, encoded;
    ``id_field`` makes the decision id's attribute (empty: span limits dropped it)."""

    __slots__ = ("encoded", "id_length", "_id_prefixes")

    def __init__(self, name: str, attributes: dict[str, Any], error: str | None, limits: Any) -> None:
        from opentelemetry.attributes import BoundedAttributes
        from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

        bounded = BoundedAttributes(limits.max_span_attributes, {_KEY_DECISION_ID: "", **attributes}, immutable=False,
                                    max_value_len=limits.max_span_attribute_length)
        kept = dict(bounded)
        self.id_length: int | None = limits.max_span_attribute_length  # longer decision ids are cut
        self._id_prefixes: dict[int, bytes] | None = {} if kept.pop(_KEY_DECISION_ID, None) is not None else None
        status = Status(code=Status.STATUS_CODE_ERROR, message=error) if error is not None else Status()
        self.encoded = Span(name=name, kind=Span.SPAN_KIND_SERVER, attributes=_key_values(kept),
                            dropped_attributes_count=bounded.dropped, status=status).SerializeToString()

    @property
    def has_id(self) -> bool:
        return self._id_prefixes is not None

    def id_value(self, decision_id: str) -> bytes:
        """The decision id's bytes, cut as the span limits cut attribute values."""
        return (decision_id[:self.id_length] if self.id_length is not None else decision_id).encode()

    def id_prefix(self, length: int) -> bytes:
        """The decision id's attribute up to its value, for a value of ``length`` bytes."""
        prefixes = self._id_prefixes
        if prefixes is None:
            return b""
        prefix = prefixes.get(length)
        if prefix is None:  # everything before the value's bytes depends on its length only
            from opentelemetry.proto.common.v1.common_pb2 import KeyValue

            value = KeyValue(key=_KEY_DECISION_ID, value=any_value("x" * length)).SerializeToString()
            prefix = prefixes[length] = field(_ATTRIBUTE, value)[:-length]
        return prefix

    def id_field(self, value: bytes) -> bytes:
        """The decision id's attribute for its ``id_value``."""
        if self._id_prefixes is None:
            return b""
        return self.id_prefix(len(value)) + value


class EventsPart:
    """The events of one shape (names, attributes but the duration, what limits dropped), encoded:
    per event, the bytes before its timestamp, between the timestamp and the duration, and after."""

    __slots__ = ("events", "first", "dropped")

    def __init__(self, shape: Sequence[tuple[str, Sequence[tuple[str, Any]]]], limits: Any) -> None:
        from opentelemetry.attributes import BoundedAttributes
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
        from opentelemetry.proto.trace.v1.trace_pb2 import Span

        kept = len(shape) if limits.max_events is None else min(len(shape), limits.max_events)
        self.first = len(shape) - kept  # the SDK's bounded list drops the oldest events
        self.dropped = b"\x60" + varint(self.first) if self.first else b""  # dropped_events_count (12)
        duration = KeyValue(key=_KEY_DURATION, value=AnyValue(double_value=0.5))
        duration_field = field(b"\x1a", duration.SerializeToString())
        self.events: list[tuple[struct.Struct, bytes, bytes, bytes]] = []
        for name, extra in shape[self.first:]:
            bounded = BoundedAttributes(limits.max_event_attributes, {_KEY_DURATION: 0.0, **dict(extra)},
                                        max_value_len=limits.max_attribute_length)
            attributes = dict(bounded)
            timed = attributes.pop(_KEY_DURATION, None) is not None
            rest = Span.Event(name=name, attributes=_key_values(attributes),
                              dropped_attributes_count=bounded.dropped).SerializeToString()
            middle = duration_field[:-8] if timed else b""  # the double is the field's last 8 bytes
            size = 9 + (len(middle) + 8 if timed else 0) + len(rest)  # time_unix_nano (1, fixed64) first
            head = _EVENT + varint(size) + b"\x09"
            packer = struct.Struct(f"<{len(head)}sQ{len(middle)}sd{len(rest)}s" if timed else
                                   f"<{len(head)}sQ{len(rest)}s")
            self.events.append((packer, head, middle, rest))


def span_frame(trace_id: bytes, span_id: bytes, parent: bytes, start_ns: int, end_ns: int, id_field: bytes,
               attributes: AttributesPart, events: EventsPart, timings: Sequence[Any]) -> bytes:
    """One span, framed as an entry of ``ScopeSpans.spans``, for any parent: ``parent`` is
    ``parent_fields`` or ``ROOT_FLAGS``; ``timings``: each event's start (ns) and µs, flat."""
    parts = [_TRACE_ID, trace_id, _SPAN_ID, span_id, parent, _TIMES.pack(0x39, start_ns, 0x41, end_ns), id_field,
             attributes.encoded, events.dropped]
    first = 2 * events.first
    for (packer, head, middle, rest), at_ns, duration_us in zip(events.events, timings[first::2],
                                                                timings[first + 1::2]):
        parts.append(packer.pack(head, at_ns, middle, duration_us, rest) if middle else packer.pack(head, at_ns, rest))
    body = b"".join(parts)
    return _SPAN + varint(len(body)) + body


class SpanLayout:
    """The spans of one shape (``AttributesPart``, ``EventsPart``), with a remote parent without
    trace state or none, and a decision id of one length, as one ``struct``: the framed span's
    constant bytes are its ``s`` fields, so ``pack`` puts in the ids, the times and the durations
    with one call (``span_frame``'s parts and join cost twice as much).

    ``pack(trace_id, span_id, parent_id, start_ns, end_ns, decision_id, began, times)`` takes the
    phase clock's own times: ``began`` when the first event began (``spans.first_began``), ``times``
    when each marked phase ended; each event's start and µs are worked out inside, as
    ``spans.phase_timeline`` does (tests/unit/test_tracing_wire.py holds the two to the same bytes).
    It is a function written for the layout (``_pack_source``) that hands ``struct.pack`` its ~30
    arguments, constants and values, in one call: filling a copy of a template list slot by slot,
    then unpacking it into the call, cost four times as long."""

    __slots__ = ("pack",)

    @staticmethod
    def of(attributes: AttributesPart, events: EventsPart, remote_parent: bool, id_length: int) -> SpanLayout | None:
        """The layout for these parts, or None when span limits dropped some event's duration (then
        ``span_frame`` it is)."""
        timed = all(middle for _, _, middle, _ in events.events)
        return SpanLayout(attributes, events, remote_parent, id_length) if timed else None

    def __init__(self, attributes: AttributesPart, events: EventsPart, remote_parent: bool, id_length: int) -> None:
        # constant bytes, or (the expression of a value, its struct format)
        pieces: list[bytes | tuple[str, str]] = [_TRACE_ID, ("trace_id", "16s"), _SPAN_ID, ("span_id", "8s")]
        pieces += [_PARENT_ID, ("parent_id", "8s"), REMOTE_PARENT_FLAGS] if remote_parent else [ROOT_FLAGS]
        pieces += [b"\x39", ("start_ns", "Q"), b"\x41", ("end_ns", "Q")]
        if attributes.has_id:
            pieces += [attributes.id_prefix(id_length), ("decision_id", f"{id_length}s")]
        pieces += [attributes.encoded, events.dropped]
        # event i begins when phase i - 1 ended (the first at ``began``), and ends when phase i did (the last at
        # ``end_ns``); limits may have dropped the first events
        marks = events.first + len(events.events) - 1
        ends = [f"t{index}" for index in range(marks)] + ["end_ns"]
        begins = ["began"] + ends[:-1]
        for index, (_, head, middle, rest) in enumerate(events.events, events.first):
            at, until = begins[index], ends[index]
            pieces += [head, (at, "Q"), middle, (f"(({until} - {at}) / 1000 if {until} > {at} else 0.0)", "d"), rest]
        merged: list[bytes | tuple[str, str]] = []
        for piece in pieces:  # neighbouring constant bytes become one field
            if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += piece
            elif piece != b"":
                merged.append(piece)
        fields = [f"{len(piece)}s" if isinstance(piece, bytes) else piece[1] for piece in merged]
        size = sum(struct.calcsize("<" + field) for field in fields)
        merged.insert(0, _SPAN + varint(size))
        fields.insert(0, f"{len(merged[0])}s")
        first, second = merged[0], merged[1]
        if isinstance(first, bytes) and isinstance(second, bytes):
            merged[:2] = [first + second]
            fields[:2] = [f"{len(first + second)}s"]
        packer = struct.Struct("<" + "".join(fields))
        namespace: dict[str, Any] = {}
        exec(_pack_source(merged, marks), {}, namespace)  # noqa: S102 (source made of our own names: see _pack_source)
        constants = [piece for piece in merged if isinstance(piece, bytes)]
        self.pack: Callable[[bytes, bytes, bytes | None, int, int, bytes, int, Sequence[int]], bytes] = \
            namespace["layout"](packer.pack, *constants)


def _pack_source(merged: Sequence[bytes | tuple[str, str]], marks: int) -> str:
    """``def layout(_pack, c0, c1...)`` giving ``pack(trace_id, span_id, parent_id, start_ns,
    end_ns, decision_id, began, times)``, which returns ``_pack(c0, trace_id, c1, ...)``: the
    layout's fields in order, its constant bytes as ``c<i>`` (closure cells), the rest as the
    expressions ``SpanLayout`` wrote of those arguments and ``t<i>``, the ``marks`` times. Only
    those names reach this source, never data."""
    constants, arguments = 0, []
    for piece in merged:
        if isinstance(piece, bytes):
            arguments.append(f"c{constants}")
            constants += 1
        else:
            arguments.append(piece[0])
    unpack = f"        {''.join(f't{index}, ' for index in range(marks))}= times\n" if marks else ""
    return (f"def layout(_pack, {', '.join(f'c{index}' for index in range(constants))}):\n"
            f"    def pack(trace_id, span_id, parent_id, start_ns, end_ns, decision_id, began, times):\n"
            f"{unpack}"
            f"        return _pack({', '.join(arguments)})\n"
            f"    return pack\n")


def export_request(resource_spans: bytes, scope_spans: bytes, frames: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` of one resource and scope (their fields as encoded by the
    SDK, without spans) holding the framed spans.

    One join of everything, its lengths summed first: a request of 512 spans is ~250 KB, and
    nesting it (scope, then resource, then request, each a new bytes object) copied it three
    times into fresh memory, the kernel's fresh pages at that size: ~1 ms a request, 2 µs a span,
    where one join takes 0.05 ms."""
    scope_size = len(scope_spans) + sum(map(len, frames))
    scope_head = _SPAN + varint(scope_size)
    resource_size = len(resource_spans) + len(scope_head) + scope_size
    return b"".join([_RESOURCE_SPANS, varint(resource_size), resource_spans, scope_head, scope_spans, *frames])
