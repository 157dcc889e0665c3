"""The OTLP path's own readings of what the SDK decides (``tracing.otlp``): the sampler's rule
gives the SDK sampler's answer for roots and remote parents, sampled or not, over many trace
ids, and so does ``OtlpSpans.sample`` from a request's ``traceparent`` as a decision starts; a ``traceparent`` is read as the SDK's W3C propagator reads it, odd ones included; and the
tracer's queue is bounded, counts what it drops and what the sampler drops, and ``flush`` waits
for what was observed before it; a bug in keeping a span costs that span only; and the span of a
decision the cache answered is made as it ends, the same span the tracer's thread would make."""

from __future__ import annotations

import itertools
import random
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz_server.tracing.attributes import SPAN_NAME, parse_traceparent
from authz_server.tracing import otlp
from authz_server.tracing.otlp import OtlpSpans, _sampled, sampler_rules
from authz_server.tracing.spans import NOT_SAMPLED, DecisionTracer

SAMPLERS = [("always_on", None), ("always_off", None), ("traceidratio", "0.3"), ("parentbased_always_on", None),
            ("parentbased_always_off", None), ("parentbased_traceidratio", "0.3"), (None, None)]


@pytest.mark.parametrize(("name", "arg"), SAMPLERS)
def test_the_samplers_rule_answers_as_the_sdk_sampler(monkeypatch: pytest.MonkeyPatch, name: str | None,
                                                      arg: str | None) -> None:
    for variable, value in (("OTEL_TRACES_SAMPLER", name), ("OTEL_TRACES_SAMPLER_ARG", arg)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    sampler = TracerProvider().sampler  # as the environment gives it to the SDK
    rules = sampler_rules(sampler)
    assert rules is not None
    root, sampled_parent, unsampled_parent = rules
    sink = OtlpSpans(None, Resource.create(), rules, SpanLimits())
    draw = random.Random(27)
    for _ in range(2000):
        trace_id = draw.getrandbits(128) or 1
        monkeypatch.setattr(otlp, "_getrandbits", lambda bits: trace_id)  # a root's new trace id
        for flags, rule in ((None, root), (TraceFlags.SAMPLED, sampled_parent), (TraceFlags.DEFAULT, unsampled_parent)):
            span_id = draw.getrandbits(64) or 1
            context = None if flags is None else set_span_in_context(NonRecordingSpan(SpanContext(
                trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))))
            expected = sampler.should_sample(context, trace_id, SPAN_NAME).decision.is_sampled()
            assert _sampled(rule, trace_id) is expected
            # and as a decision starts (``sample``), from the request's traceparent, or none
            headers = {} if flags is None else {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"}
            kept = sink.sample(SimpleNamespace(headers=headers, attributes_factory=None))
            assert (kept is not None) is expected
            if kept is not None:
                parent = None if flags is None else span_id.to_bytes(8, "big")
                assert read(sink, kept) == (trace_id.to_bytes(16, "big"), parent, None, None)
            if flags is not None:  # a traceparent the propagator refuses, whatever its flags: the parent is none
                ids = f"{trace_id:032x}-{span_id:016x}"
                for broken in (f"00-{ids.upper()}-{flags:02x}", f"00-{0:032x}{ids[32:]}-{flags:02x}",
                               f"ff-{ids}-{flags:02x}", f"00-{ids}-0"):
                    kept = sink.sample(SimpleNamespace(headers={"traceparent": broken}, attributes_factory=None))
                    assert (kept is not None) is _sampled(root, trace_id), broken
                    assert kept is None or read(sink, kept)[1] is None, broken  # a root


def read(sink: OtlpSpans, context: Any) -> Any:
    """A context ``sample`` left with its traceparent unread, as ``add`` reads it."""
    return sink._read(context) if context[0] is None else context


# Every mix of a traceparent's well- and ill-formed parts (the grammar, its positions, its flags' digits)
_TRACEPARENTS = [f"{lead}{version}-{trace}-{span}-{flags}{tail}" for lead, version, trace, span, flags, tail in
                 itertools.product(["", " ", "\t"], ["00", "01", "ff", "0g"],
                                   ["0af7651916cd43dd8448eb211c80319c", "0" * 32, "0AF7651916CD43DD8448EB211C80319C",
                                    "0af7651916cd43dd8448eb211c8031"],
                                   ["b7ad6b7169203331", "0" * 16, "b7ad6b71692033"],
                                   [*(f"0{digit}" for digit in "0123456789abcdefB"), "10", "ff", "0", "1", "x1"],
                                   ["", " ", "-future", "-", "x"])]


@pytest.mark.parametrize("name", ["parentbased_always_on", "always_on", None])
def test_a_traceparent_left_unread_is_sampled_and_read_as_the_parse_reads_it(
        monkeypatch: pytest.MonkeyPatch, name: str | None) -> None:
    """Where ``sample`` tells a span sampled from two characters, it is what reading the whole
    ``traceparent`` answers, and ``add``'s reading gives the context reading it at once gives."""
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    if name is None:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    rules = sampler_rules(TracerProvider().sampler)
    assert rules is not None
    quick, whole = (OtlpSpans(None, Resource.create(), rules, SpanLimits()) for _ in range(2))
    whole.samples_by_flags = False  # reads every traceparent as a decision starts
    unread = 0
    for traceparent, tracestate in itertools.product(_TRACEPARENTS, [None, "k=v"]):
        headers = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
        facts = SimpleNamespace(headers=headers, attributes_factory=None)
        answer, expected = quick.sample(facts), whole.sample(facts)
        assert (answer is None) is (expected is None), traceparent
        if answer is not None:
            unread += answer[0] is None
            resolved = read(quick, answer)
            assert resolved[1:] == expected[1:], traceparent  # the parent, the trace state
            if expected[1] is not None:  # (a root's trace id is drawn anew)
                assert resolved[0] == expected[0], traceparent
    assert unread > 100  # the two characters did tell


class _Custom(Sampler):
    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        raise NotImplementedError

    def get_description(self) -> str:
        return "custom"


def test_a_sampler_it_cannot_read_sends_tracing_to_the_sdk_path() -> None:
    assert sampler_rules(_Custom()) is None
    assert sampler_rules(ParentBased(root=_Custom())) is None
    assert sampler_rules(ParentBased(root=ALWAYS_ON, remote_parent_sampled=_Custom())) is None
    assert sampler_rules(ParentBased(root=TraceIdRatioBased(0.5))) is not None


def _sdk_reading(value: str) -> tuple[bytes, bytes, bool] | None:
    context = TraceContextTextMapPropagator().extract({"traceparent": value})
    span = get_current_span(context).get_span_context()
    if not span.is_valid:
        return None
    return span.trace_id.to_bytes(16, "big"), span.span_id.to_bytes(8, "big"), span.trace_flags.sampled


def test_a_traceparent_is_read_as_the_sdks_propagator_reads_it() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    values = [good, good[:-2] + "00", good[:-2] + "03", good[:-2] + "ff", " \t" + good + " ", good + "\n",
              good.upper(), "ff" + good[2:], "01" + good[2:] + "-later", good + "-later", "cc" + good[2:],
              good.replace("4bf92f3577b34da6a3ce929d0e0e4736", "0" * 32), good.replace("00f067aa0ba902b7", "0" * 16),
              good[:-1], good + "1", good.replace("-", "_"), "", "00-" + "g" * 32 + "-" + "1" * 16 + "-01",
              "00-" + "1" * 32 + "-" + "1" * 16 + "-01" + " " * 600]
    draw = random.Random(27)
    for _ in range(4000):  # and good ones with one or two characters changed
        changed = list(good)
        for _ in range(draw.choice((1, 2))):
            changed[draw.randrange(len(changed))] = draw.choice("0123456789abcdefABCDEF- \t\n\x0bzé")
        values.append("".join(changed))
    values += ["00-" + "0" * 31 + "1-" + "0" * 16 + "-01", "00-1" + "0" * 31 + "-" + "0" * 15 + "1-00",
               "00-" + "1" * 30 + " 1-" + "1" * 16 + "-01", "00-" + "1" * 32 + "-" + "1" * 16 + "- 1",
               "00-" + "1" * 32 + "-" + "1" * 16 + "-1 "]
    for value in values:
        assert parse_traceparent(value) == _sdk_reading(value), value


_HEX = frozenset("0123456789abcdef")


def _reference_reading(value: str) -> tuple[bytes, bytes, bool] | None:
    """W3C trace context read field by field, with the SDK's limits (512 characters, blanks around the
    value) and the quirks of its regular expression (``$`` also before a last newline; ``.`` no newline)."""
    if len(value) > 512:
        return None
    text = value.lstrip(" \t")
    if len(text) < 55 or text[2] != "-" or text[35] != "-" or text[52] != "-":
        return None
    version, trace_hex, span_hex, flags, rest = text[:2], text[3:35], text[36:52], text[53:55], text[55:]
    if not set(version + trace_hex + span_hex + flags) <= _HEX:
        return None
    rest = rest[:-1] if rest.endswith("\n") else rest
    if "\n" in rest or rest and rest[0] != "-" and rest.strip(" \t"):
        return None
    later = rest.startswith("-")  # a future version's fields
    if version == "ff" or version == "00" and later or set(trace_hex) == {"0"} or set(span_hex) == {"0"}:
        return None
    return bytes.fromhex(trace_hex), bytes.fromhex(span_hex), int(flags, 16) % 2 == 1


def _hex(size: int) -> st.SearchStrategy[str]:
    return st.one_of(st.text("0123456789abcdef", min_size=size, max_size=size), st.just("0" * size),
                     st.text("0123456789", min_size=size, max_size=size),
                     st.text("0123456789abcdefABCDEF", min_size=size, max_size=size),
                     st.text("0123456789abcdefg- \té", min_size=size - 1, max_size=size + 1))


_traceparents = st.builds(
    "{}{}{}{}{}{}{}{}{}".format, st.sampled_from(["", "", " ", "\t "]),
    st.one_of(st.sampled_from(["00", "01", "cc", "ff", "0A"]), _hex(2)), st.sampled_from(["-", "-", "_"]),
    _hex(32), st.sampled_from(["-", "-", " "]), _hex(16), st.sampled_from(["-", "-", ""]), _hex(2),
    st.one_of(st.sampled_from(["", "", "", " ", "\n", "-", "-later", "-x\n", " \t\n", "\nx", "-a\nb", "x"]),
              st.text(max_size=600)))


@settings(max_examples=3000, deadline=None)
@given(value=_traceparents)
def test_a_traceparent_is_read_as_the_w3c_fields_say(value: str) -> None:
    assert parse_traceparent(value) == _reference_reading(value) == _sdk_reading(value), value


class _Sink:
    """Keeps what it is given; ``add`` blocks while ``hold`` is clear."""

    def __init__(self) -> None:
        self.added: list[Any] = []
        self.sent = 0
        self.hold = threading.Event()
        self.hold.set()

    def sample(self, facts: Any) -> Any:
        return None if facts == "unsampled" else facts

    def keep(self, decision: Any, facts: Any, now: float) -> Any:
        if decision.name == "a bug":
            raise RuntimeError("a bug in making a span")
        return None if decision.name == "unsampled" else decision.name

    def add(self, kept: Any) -> bool:
        self.hold.wait()
        self.added.append(kept)
        return kept != "dropped by the sampler"

    def send(self) -> None:
        self.sent += 1

    def flush(self, timeout: float) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def decision(name: str, phase_clock: Any = None) -> Any:
    return SimpleNamespace(name=name, phase_clock=phase_clock)


def test_the_queue_is_bounded_drops_are_counted_and_flush_waits_for_what_came_before() -> None:
    sink = _Sink()
    tracer = DecisionTracer(sink, max_queue=3, delay=3600)  # the thread wakes only when asked
    try:
        assert tracer.start("unsampled") is NOT_SAMPLED and tracer.start("x").context == "x"
        tracer.observe(decision("never kept", tracer.start("unsampled")), None, 0.0)  # dropped at its start
        for name in ("a", "unsampled", "b", "dropped by the sampler", "c", "d"):
            tracer.observe(decision(name), None, 0.0)
        assert (tracer.dropped, tracer.unsampled) == (2, 2)  # c and d: the queue held three
        assert tracer.flush(10)
        assert sink.added == ["a", "b", "dropped by the sampler"] and sink.sent >= 1
        assert (tracer.traced, tracer.unsampled) == (2, 3)
        sink.hold.clear()  # the thread is busy with "e" when "f" comes: flush still waits for "f"
        tracer.observe(decision("e"), None, 0.0)
        tracer._wake.set()
        tracer.observe(decision("f"), None, 0.0)
        done = threading.Thread(target=lambda: sink.hold.set())
        done.start()
        assert tracer.flush(10)
        assert sink.added[-2:] == ["e", "f"]
        done.join()
        metrics = {family.name: family.samples[0].value for family in tracer.collect()}
        assert metrics["authz_tracing_spans"] == 4 and metrics["authz_tracing_spans_dropped"] == 2
        assert metrics["authz_tracing_unsampled"] == 3 and metrics["authz_tracing_cpu_seconds"] >= 0
    finally:
        tracer.shutdown(timeout=5)


def test_a_bug_in_keeping_a_span_costs_that_span_never_the_decision() -> None:
    tracer = DecisionTracer(_Sink(), delay=3600)
    try:
        tracer.observe(decision("a bug"), None, 0.0)  # on the request path: must not raise
        tracer.observe(decision("a"), None, 0.0)
        assert list(tracer._queue) == ["a"]
    finally:
        tracer.shutdown(timeout=5)


def test_the_span_of_a_decision_the_cache_answered_is_made_as_it_ends() -> None:
    """Made on the request path (no evaluation left its caches cold), the thread only exports it;
    after an evaluation the thread makes the span. The same span either way, but for its ids, its
    times and what it says of the cache."""
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    from authz_server.tracing.spans import PhaseClock

    sink = OtlpSpans(None, Resource.create(), sampler_rules(ALWAYS_ON), SpanLimits())  # type: ignore[arg-type]
    made = []
    for cached in (True, False):
        clock = PhaseClock(sink.sample(None))
        clock.mark("identity")
        clock.mark("cache", cached)
        answer = SimpleNamespace(decision_id="d-1", allowed=True, code="allowed", phase="policy", cached=cached,
                                 policy_version="v1", http_status=200, dry_run=False, would_allow=None, verdict=True,
                                 identity=SimpleNamespace(document={}), signals={}, phase_clock=clock)
        kept = sink.keep(answer, None, 0.0)
        assert isinstance(kept, bytes) is cached
        sink.add(kept)
        made.append(ScopeSpans.FromString(sink._frames.pop()).spans[0])

    def essentials(span: Any) -> tuple[Any, ...]:  # all but the ids, the times and whether it was cached
        attributes = {kv.key: kv.value for kv in span.attributes if kv.key != "authz.cached"}
        return span.name, span.kind, [event.name for event in span.events], attributes

    assert [kv.value.bool_value for span in made for kv in span.attributes if kv.key == "authz.cached"] == [True, False]
    assert essentials(made[0]) == essentials(made[1]) and len(made[0].attributes) > 5


@pytest.mark.parametrize("traceparent", ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                                         "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-00",
                                         "00-" + "0" * 32 + "-00f067aa0ba902b7-00",
                                         "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                                         "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later"])
def test_only_a_valid_unsampled_traceparent_drops_a_span_as_it_starts(traceparent: str) -> None:
    """The default sampler (parent-based, always on) drops a span under a parent that says not
    sampled; a traceparent the SDK's propagator refuses is no parent, and the span a sampled root:
    both sinks, as the SDK's tracer would decide."""
    from opentelemetry.sdk.trace import TracerProvider as Provider
    from opentelemetry.sdk.trace.sampling import DEFAULT_ON

    from authz_server.tracing.sdkspans import SdkSpans

    facts = SimpleNamespace(headers={"traceparent": traceparent}, attributes_factory=None)
    valid = _sdk_reading(traceparent) is not None
    provider = Provider(sampler=DEFAULT_ON)
    tracer = provider.get_tracer("test")
    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    assert tracer.start_span("x", context=context).get_span_context().trace_flags.sampled is not valid
    fast = OtlpSpans(None, Resource.create(), sampler_rules(DEFAULT_ON), SpanLimits())  # type: ignore[arg-type]
    assert (fast.sample(facts) is None) is valid
    assert (SdkSpans(provider).sample(facts) is None) is valid
    provider.shutdown()
