"""The OTLP path (``tracing.otlp``: spans encoded straight into export requests, no SDK span)
sends what the SDK path (``tracing.sdkspans``: an SDK span per decision, the SDK's batch processor
and encoder) sends for the same decisions, as two real OTLP receivers on loopback got them: span
by span (name, kind, trace and parent ids, trace state, times, attributes and their order, events,
status, flags, what span limits dropped), with the same resource and scope; over OTLP/gRPC and
OTLP/HTTP, with the SDK's default limits and with tight ones, under the default sampler and a
parent-based one that drops roots. Only the span's own id (random on both paths) and a root
span's trace id (likewise) are left out of the comparison."""

from __future__ import annotations

import asyncio
import difflib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from authz_server.config import Config
from authz_server.decision import Decision
from authz_server.identity.verified import Identity
from authz_server.tracing import otlp, sdkspans
from authz_server.tracing.otlp import OtlpSpans
from authz_server.tracing.sdkspans import SdkSpans
from authz_server.tracing.setup import tracing_from_env
from authz_server.tracing.spans import DecisionTracer
from tests.support.audit import check_request_bytes, grpc_check, workload, write_audit_policy
from tests.support.authz import running_app
from tests.support.otlp import OtlpReceiver, ReceivedSpan

TRUST_DOMAIN = "example.org"
TIGHT_LIMITS = {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "6", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "10",
                "OTEL_SPAN_EVENT_COUNT_LIMIT": "2", "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": "1",
                "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "3", "OTEL_RESOURCE_ATTRIBUTES": "team=authz,tier=edge",
                "OTEL_SERVICE_NAME": "authz-edge"}
NO_ROOTS = {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}


def traceparent(flags: str = "01") -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{flags}"


class FakeFacts:
    """What a span reads of a request."""

    def __init__(self, headers: dict[str, str], transport: str = "grpc", method: str = "GET") -> None:
        self.headers, self.transport, self.method, self.attributes_factory = headers, transport, method, None


def tracers(monkeypatch: pytest.MonkeyPatch, fast_to: str, sdk_to: str, protocol: str,
            extra: dict[str, str]) -> tuple[DecisionTracer, DecisionTracer]:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    for name, value in {**extra, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_BSP_SCHEDULE_DELAY": "50"}.items():
        monkeypatch.setenv(name, value)
    # One end for every decision on both paths: each path reads its clock when it keeps a decision.
    end_ns = time.time_ns() + 2_000_000_000
    monkeypatch.setattr(otlp, "_clock_ns", lambda: end_ns)  # before the tracers are made: they hold their clocks
    monkeypatch.setattr(sdkspans, "_clock_ns", lambda: end_ns)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", fast_to)
    fast = tracing_from_env()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sdk_to)
    sdk = tracing_from_env(sdk_spans=True)
    for name in list(os.environ):  # the app builds no tracer of its own
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    assert fast is not None and sdk is not None
    assert isinstance(fast.sink, OtlpSpans) and isinstance(sdk.sink, SdkSpans)
    return fast, sdk


def comparable(received: ReceivedSpan) -> tuple[str, str, str]:
    span = type(received.span)()
    span.CopyFrom(received.span)
    span.ClearField("span_id")  # random on both paths
    if not span.parent_span_id:
        span.ClearField("trace_id")  # a root's: likewise
    return str(span), str(received.scope), str(received.resource_spans)


def synthetic(fast: DecisionTracer) -> list[tuple[Decision, Any]]:
    """Decisions the app rarely makes: errors, dry runs, signals, explanations, odd methods."""
    user = Identity({"method": "session", "user": {"sub": "alice"}, "workload": {"spiffe_id": workload("web")}})
    out: list[tuple[Decision, Any]] = []
    for index, (code, phase, headers, method) in enumerate((
            ("policy_timeout", "policy", {"traceparent": traceparent(), "tracestate": "vendor=1,other=x"}, "GET"),
            ("internal_error", "internal", {"traceparent": traceparent()}, "BREW"),
            ("policy_denied", "policy", {}, "post"),
            ("allowed", "policy", {"traceparent": " " + traceparent() + " "}, "GET"),  # spaces: still read
            ("allowed", "policy", {"traceparent": traceparent().upper()}, "GET"),  # not W3C: a root
            ("allowed", "policy", {"traceparent": "01-" + traceparent()[3:] + "-future"}, "GET"),  # a later version
            ("allowed", "policy", {"traceparent": traceparent("00")}, "GET"))):  # not sampled
        facts = FakeFacts(headers, method=method)
        clock = fast.start(facts)
        clock.mark("identity")
        clock.mark("signals")
        clock.mark("cache", False)
        clock.mark("policy", "full" if index == 0 else None)
        allowed = code == "allowed"
        decision = Decision(allowed=allowed, code=code, reason="", http_status=200 if allowed else 403,
                            decision_id=f"0190a0b0-0000-7000-8000-{index:012d}", phase=phase, policy_version="v7",
                            identity=user, signals={"risk": 1, "asn": 2} if index % 2 else {},
                            dry_run=index == 2, would_allow=False if index == 2 else None,
                            explanation={"mode": "full"} if index == 0 else None, phase_clock=clock)
        out.append((decision, facts))
    return out


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("extra", [{}, TIGHT_LIMITS, NO_ROOTS], ids=["defaults", "tight-limits", "no-roots"])
async def test_the_otlp_path_sends_what_the_sdk_path_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            protocol: str, extra: dict[str, str]) -> None:
    with OtlpReceiver() as fast_rx, OtlpReceiver() as sdk_rx:
        endpoint = (lambda rx: rx.grpc_endpoint) if protocol == "grpc" else (lambda rx: rx.http_endpoint)
        fast, sdk = tracers(monkeypatch, endpoint(fast_rx), endpoint(sdk_rx), protocol, extra)
        config = Config(policies=str(write_audit_policy(tmp_path / "policies")), http_addr="127.0.0.1:0",
                        trust_domains=(TRUST_DOMAIN,))
        async with running_app(config) as app:
            assert app.tracing is None
            app.pipeline.tracing = fast  # the phase clock: one for both
            app.pipeline.observers.extend([fast.observe, sdk.observe])
            async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
                check = grpc_check(channel)
                header = traceparent()
                for _ in range(3):  # decided, then cached, then repeated
                    await check(check_request_bytes("/public/x", principal=workload("web"),
                                                    headers={"traceparent": header}))
                await check(check_request_bytes("/private", principal=workload("web")))  # denied, a root
                await check(check_request_bytes("/public/y", principal=workload("web"),
                                                headers={"traceparent": traceparent(), "tracestate": "k=v"}))
                await check(b"\x0a\x03\x0a\x01")  # refused before facts exist
            async with httpx.AsyncClient(base_url=f"http://{app.bound['http_addr']}", timeout=10) as client:
                await client.get("/check/public/z", headers={"traceparent": traceparent(),
                                                            "x-forwarded-client-cert": f"URI={workload('web')}"})
                await client.get("/check/private", headers={"x-forwarded-client-cert": f"URI={workload('web')}"})
            for decision, facts in synthetic(fast):
                now = time.time()
                fast.observe(decision, facts, now)
                sdk.observe(decision, facts, now)
            assert await asyncio.to_thread(fast.flush) and await asyncio.to_thread(sdk.flush)
        sdk_spans = await asyncio.to_thread(sdk_rx.wait_for, lambda got: len(got) >= sdk.traced)
        fast_spans = await asyncio.to_thread(fast_rx.wait_for, lambda got: len(got) >= fast.traced)
        fast.shutdown()
        sdk.shutdown()
    assert (fast.traced, fast.unsampled, fast.dropped) == (sdk.traced, sdk.unsampled, sdk.dropped)
    assert fast.traced == len(fast_spans) == len(sdk_spans) >= (5 if extra is NO_ROOTS else 10)
    for index, (ours, theirs) in enumerate(zip(fast_spans, sdk_spans)):
        assert comparable(ours) == comparable(theirs), f"span {index}:\n" + "\n".join(difflib.unified_diff(
            "\n".join(comparable(theirs)).splitlines(), "\n".join(comparable(ours)).splitlines(), "sdk", "otlp",
            lineterm=""))
    if extra is TIGHT_LIMITS:
        assert all(span.span.dropped_attributes_count for span in fast_spans)
    elif extra is not NO_ROOTS:
        assert {"ERROR", "UNSET"} <= {type(s.span.status).StatusCode.Name(s.span.status.code)[12:] for s in fast_spans}


def test_other_exporters_and_samplers_take_the_sdk_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    cases: list[tuple[dict[str, str], type]] = [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, OtlpSpans),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1",
          "OTEL_PROPAGATORS": "tracecontext"}, OtlpSpans),
        ({"OTEL_TRACES_EXPORTER": "console"}, SdkSpans),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, SdkSpans),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PROPAGATORS": "baggage"}, SdkSpans),
    ]
    for environ, sink in cases:
        with monkeypatch.context() as patch:
            for name, value in environ.items():
                patch.setenv(name, value)
            tracer = tracing_from_env()
            assert tracer is not None
            try:
                assert type(tracer.sink) is sink, environ
            finally:
                tracer.shutdown(timeout=1)
