"""The OTLP path's own readings of what the SDK decides (``tracing.otlp``): the sampler's rule
gives the SDK sampler's answer for roots and remote parents, sampled or not, over many trace
ids, and so does ``OtlpSpans.sample`` from a request's ``traceparent`` as a decision starts; a ``traceparent`` is read as the SDK's W3C propagator reads it, odd ones included; and the
tracer's queue is bounded, counts what it drops and what the sampler drops, and ``flush`` waits
for what was observed before it."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz_server.tracing.attributes import SPAN_NAME
from authz_server.tracing import otlp
from authz_server.tracing.otlp import OtlpSpans, _parse_traceparent, _sampled, sampler_rules
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
                assert kept == (trace_id.to_bytes(16, "big"), None if flags is None else span_id.to_bytes(8, "big"),
                                None, None)


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
        assert _parse_traceparent(value) == _sdk_reading(value), value


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
