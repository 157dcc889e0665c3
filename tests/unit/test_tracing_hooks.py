"""Tracing's request-path hooks in C (``tracing/_hooks.c``) answer as their Python forms do, which
run where the module is not built: the phase clock marks the same; a decision starts under the
same sampler's answer, for every kind of ``traceparent``, sampler and place the header is in; a
span keeps the same of every kind of decision; the usual span is made with the same bytes (the
rest handed to the Python form); and ``observe`` counts, drops, wakes and survives a bug alike."""

from __future__ import annotations

import functools
import itertools
import logging
import random
import time
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider

from authz_server.decision import Decision
from authz_server.tracing import _hooks, otlp
from authz_server.tracing.otlp import OtlpSpans, sampler_rules
from authz_server.tracing.spans import NOT_SAMPLED, DecisionTracer, PhaseClock

SAMPLERS = [("parentbased_always_on", None), ("always_on", None), ("parentbased_always_off", None),
            ("parentbased_traceidratio", "0.5"), ("always_off", None)]
TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENTS = [None, "", f"00-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}-00", f"00-{TRACE}-{SPAN}-03",
                f"00-{TRACE}-{SPAN}-0a", f"00-{TRACE.upper()}-{SPAN}-00", f"00-{'0' * 32}-{SPAN}-00",
                f"00-{TRACE}-{'0' * 16}-00", f"ff-{TRACE}-{SPAN}-00", f"01-{TRACE}-{SPAN}-00-later",
                f" 00-{TRACE}-{SPAN}-00", f"00-{TRACE}-{SPAN}-00 ", f"00-{TRACE}-{SPAN[:-1]}g-00", "00-short-01",
                f"00-{TRACE}-{SPAN}-0", "x", f"00-{TRACE}-{SPAN}-01-", f"00-{TRACE}x{SPAN}-01"]


def _sink(monkeypatch: pytest.MonkeyPatch, name: str, arg: str | None) -> OtlpSpans:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    if arg is None:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    rules = sampler_rules(TracerProvider().sampler)
    assert rules is not None
    return OtlpSpans(SimpleNamespace(shutdown=lambda: None), Resource.create(), rules, SpanLimits())


def _facts(traceparent: str | None, tracestate: str | None, volatile: bool, method: str = "GET") -> Any:
    """A request's facts as the tracing hooks read them: the trace headers in ``headers`` (HTTP
    mode), or kept apart with the volatile values (gRPC mode)."""
    headers = {name: value for name, value in (("traceparent", traceparent), ("tracestate", tracestate))
               if value is not None}
    factory = SimpleNamespace(volatile=SimpleNamespace(headers=headers)) if volatile else None
    return SimpleNamespace(headers={} if volatile else headers, attributes_factory=factory, method=method,
                           transport="grpc" if volatile else "http")


def test_the_phase_clock_marks_as_the_python_one() -> None:
    clocks = [_hooks.PhaseClock(("context",)), PhaseClock(("context",))]
    for clock in clocks:
        clock.mark("identity")
        clock.mark("cache", True)
        clock.mark("policy", "full")
    fast, reference = clocks
    assert fast.shape == reference.shape and fast.phases() == reference.phases()
    assert fast.context == ("context",) and _hooks.PhaseClock(context=None).phases() == []
    assert fast.start_ns <= fast.times[0] <= fast.times[1] <= fast.times[2] and len(fast.times) == 3
    fast.start_ns = 5
    assert fast.start_ns == 5


@pytest.mark.parametrize(("name", "arg"), SAMPLERS)
def test_a_decision_starts_under_the_answer_the_python_sampler_gives(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                     arg: str | None) -> None:
    sink = _sink(monkeypatch, name, arg)
    monkeypatch.setattr(otlp, "_getrandbits", lambda bits: 7)  # a root's trace id, the same both ways
    tracer = DecisionTracer(sink, delay=3600)
    try:
        assert isinstance(tracer.start, functools.partial) and tracer.start.func is _hooks.start
        cases = list(itertools.product(TRACEPARENTS, [None, "", "k=v"], [False, True]))
        for traceparent, facts in [*((case[0], _facts(*case)) for case in cases), (None, None)]:  # None: refused unread
            expected, started = sink.sample(facts), tracer.start(facts)
            if expected is None:
                assert started is NOT_SAMPLED, traceparent
            else:
                assert type(started) is _hooks.PhaseClock and started.context == expected, traceparent
    finally:
        tracer.shutdown(timeout=5)


def _decisions(draw: random.Random) -> list[tuple[Any, Any]]:
    """(decision, facts) of every kind a span keeps apart, a few hundred of them at random."""
    outcomes = [(True, "allowed", "policy", True), (False, "policy_denied", "policy", True),
                (False, "policy_timeout", "policy", None), (False, "internal_error", "internal", None),
                (False, "bad_request", "request", None), (True, "allowed", "unavailable", None)]
    documents = [{}, {"method": "session", "user": {"sub": "alice"}}, {"workload": {"spiffe_id": "spiffe://x/y"}},
                 {"method": None, "user": {"sub": 7}, "workload": {"spiffe_id": "spiffe://x/z"}}]
    contexts = ["unread", "parent", "root", "state", "none"]
    kinds = list(itertools.product(outcomes, [False, True], documents, [{}, {"zeta": 1, "rate": 2}],
                                   [(False, None), (True, False), (True, 1)], [None, {}, {"mode": "full"}],
                                   ["GET", "get", "BREW", 7], contexts, ["d-1", "déc-2"]))
    made = []
    for (allowed, code, phase, verdict), cached, document, signals, (dry_run, would_allow), explanation, method, \
            context, decision_id in draw.sample(kinds, 400):
        facts = _facts(f"00-{TRACE}-{SPAN}-01", "k=v" if context == "state" else None, draw.random() < 0.5, method)
        clock: Any = None
        if context != "none":
            clock = _hooks.PhaseClock({"unread": (None, None, f"00-{TRACE}-{SPAN}-01", None),
                                       "parent": (bytes(range(16)), bytes(8), None, None),
                                       "root": (bytes(range(16)), None, None, None),
                                       "state": (bytes(range(16)), bytes(8), f"00-{TRACE}-{SPAN}-01", "k=v")}[context])
            clock.mark("cache", cached)
            clock.mark("policy")
        fields = dict(decision_id=decision_id, allowed=allowed, code=code, phase=phase, cached=cached,
                      policy_version="v1", http_status=200 if allowed else 403, dry_run=dry_run,
                      would_allow=would_allow, verdict=verdict, identity=SimpleNamespace(document=document),
                      signals=signals, phase_clock=clock)
        if draw.random() < 0.5:  # the core's own (slots, read in place), or any object with those attributes
            decision: Any = Decision(reason="", explanation=explanation, **fields)
        else:
            decision = SimpleNamespace(**fields)
            if explanation is not None:
                decision.explanation = explanation
        made.append((decision, None if draw.random() < 0.05 else facts))
    return made


def test_a_span_keeps_what_the_python_keep_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = _sink(monkeypatch, "parentbased_always_on", None)
    monkeypatch.setattr(otlp, "_getrandbits", lambda bits: 7)
    made: Callable[[tuple[Any, ...]], Any] = lambda kept: ("the span of", kept[:5])  # noqa: E731
    monkeypatch.setattr(sink, "_span", made)  # the cached decision's span: what it was made of
    layout, laid_out = object(), 0
    for index, (decision, facts) in enumerate(_decisions(random.Random(28))):
        expected = OtlpSpans.keep(sink, decision, facts, 0.5)
        kept = _hooks.keep(sink._layouts, sink.sample, made, time.time_ns, decision, facts, 0.5)
        if expected is None:
            assert kept is None
            continue
        if decision.cached:
            assert kept == expected
            continue
        assert kept[:5] == expected[:5] and abs(kept[5] - expected[5]) < 10**10, decision
        if index % 2 and isinstance(expected[0], tuple):  # a layout for that shape, found the next time if laid out
            sink._layouts[expected[0]] = layout
            again = OtlpSpans.keep(sink, decision, facts, 0.5)[0]
            fast = _hooks.keep(sink._layouts, sink.sample, made, time.time_ns, decision, facts, 0.5)[0]
            assert fast == again and (fast is layout) is (again is layout)
            laid_out += again is layout
    assert laid_out > 5


def test_the_usual_span_is_made_with_the_bytes_the_python_span_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = _sink(monkeypatch, "parentbased_always_on", None)
    ids = itertools.count(1)
    monkeypatch.setattr(otlp, "_getrandbits", lambda bits: next(ids) % 3)  # 0 too: never an id
    general_spans = []

    def general(kept: tuple[Any, ...]) -> bytes:
        general_spans.append(kept)
        return sink._span(kept)

    usual, draw = 0, random.Random(29)
    for decision, facts in _decisions(draw):
        decision.cached = False
        clock = decision.phase_clock  # a request's time on the wall clock, or a test's clock
        kept = OtlpSpans.keep(sink, decision, facts, clock.start_ns / 1e9 if clock and draw.random() < 0.5 else 0.5)
        if kept is None:
            continue
        sink._span(kept)  # the shape's layout made, as the first span of a shape makes it
        before = len(general_spans)
        ids = itertools.count(1)
        span = _hooks.span(sink._layouts, lambda bits: next(ids) % 3, general, kept)
        usual += len(general_spans) == before
        ids = itertools.count(1)
        assert span == sink._span(kept), kept
    assert usual > 50  # the usual ones made in C (a trace state, a non-ASCII id: the Python form)
    assert _hooks.span(sink._layouts, random.getrandbits, lambda kept: b"general", ("odd",)) == b"general"


class _Sink:
    def __init__(self, keep: Callable[[Any], Any]) -> None:
        self.keep = lambda decision, facts, now: keep(decision)

    def sample(self, facts: Any) -> Any:
        return facts

    def add(self, kept: Any) -> bool:
        return True

    def send(self) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def _kept(decision: Any) -> Any:
    if decision.name == "a bug":
        raise ValueError("a bug in keep")
    if decision.name == "interrupted":
        raise KeyboardInterrupt
    return None if decision.name == "unsampled" else decision.name


class _Wake:
    """The tracer's wake-up, counted instead (its thread stays asleep and leaves the queue alone)."""

    def __init__(self) -> None:
        self.count = 0

    def set(self) -> None:
        self.count += 1


def test_observe_counts_drops_wakes_and_survives_a_bug_as_the_python_one(caplog: pytest.LogCaptureFixture) -> None:
    states = []
    for fast in (True, False):
        tracer = DecisionTracer(_Sink(_kept), max_queue=3, delay=3600, batch=2)
        observe = tracer.observe if fast else functools.partial(DecisionTracer.observe, tracer)
        assert isinstance(tracer.observe, functools.partial) and tracer.observe.func is _hooks.observe
        wake, tracer._wake = tracer._wake, _Wake()  # type: ignore[assignment]
        woken = []
        try:
            with caplog.at_level(logging.ERROR, logger="authz_server.tracing"):
                for name in ("a", "unsampled", "a bug", "b", "c", "d", "e"):
                    clock = NOT_SAMPLED if name == "e" else tracer.start(name)
                    observe(SimpleNamespace(name=name, phase_clock=clock), None, 0.0)
                    woken.append(tracer._wake.count)  # type: ignore[attr-defined]
                with pytest.raises(KeyboardInterrupt):
                    observe(SimpleNamespace(name="interrupted", phase_clock=tracer.start("x")), None, 0.0)
            states.append((list(tracer._queue), tracer.dropped, tracer._unsampled_observed, woken,
                           [record.getMessage() for record in caplog.records]))
            caplog.clear()
        finally:
            tracer._queue.clear()
            tracer._wake = wake
            tracer.shutdown(timeout=5)
    fast_state, reference = states
    assert fast_state == reference == (["a", "b", "c"], 1, 2, [0, 0, 0, 1, 1, 1, 1], ["could not trace a decision"])
