"""OpenTelemetry traces of decisions, received by a real OTLP collector on loopback: a span per
decision whose parent is the ``traceparent`` the request carried, through a real gRPC Check
(OTLP over gRPC) and through the HTTP front (OTLP over HTTP); Envoy's sampling decision holds;
tracing is off, and the SDK's tracing never imported, when no ``OTEL_*`` variable asks for it
(redis-py imports parts of the OpenTelemetry API for its own metrics, whatever we do)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from authz_server.config import Config
from authz_server.errors import ConfigError
from authz_server.tracing.setup import exporter_names, tracing_from_env
from tests.support.audit import check_request_bytes, grpc_check, workload, write_audit_policy
from tests.support.authz import REPO, running_app
from tests.support.otlp import OtlpReceiver, ReceivedSpan

TRUST_DOMAIN = "example.org"


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def by_decision(spans: list[ReceivedSpan], decision_id: str) -> ReceivedSpan | None:
    return next((s for s in spans if s.attributes.get("authz.decision_id") == decision_id), None)


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    with OtlpReceiver() as running:
        yield running


def otel_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, protocol: str = "grpc") -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: the test waits for spans, not for 5 s


async def test_a_grpc_check_is_a_span_under_the_requests_traceparent(tmp_path: Path, receiver: OtlpReceiver,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    otel_env(monkeypatch, receiver.grpc_endpoint)
    config = Config(policies=str(write_audit_policy(tmp_path / "policies")), trust_domains=(TRUST_DOMAIN,))
    sent = [traceparent() for _ in range(3)]
    async with running_app(config) as app:
        assert app.tracing is not None
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = grpc_check(channel)
            answers = []
            for header, _, _ in sent:  # the same request three times: decided, then cached, then repeated
                answers.append(await check(check_request_bytes("/public/x", principal=workload("web"),
                                                               headers={"traceparent": header})))
            denied = await check(check_request_bytes("/private", principal=workload("web")))
        ids = [a.dynamic_metadata["decision_id"] for a in answers]
        spans = await asyncio.to_thread(receiver.wait_for, lambda got: all(by_decision(got, i) for i in ids)
                                        and by_decision(got, denied.dynamic_metadata["decision_id"]) is not None)
    assert [a.status.code for a in answers] == [0, 0, 0] and denied.status.code == 7
    for decision_id, (_, trace_id, span_id) in zip(ids, sent):
        span = by_decision(spans, decision_id)
        assert span is not None
        assert span.span.trace_id.hex() == trace_id and span.span.parent_span_id.hex() == span_id
        assert span.span.name == "authz.decision" and span.span.kind == span.span.SPAN_KIND_SERVER
        assert span.attributes["authz.allowed"] is True and span.attributes["authz.transport"] == "grpc"
        assert span.attributes["authz.spiffe_id"] == workload("web")
        assert span.span.end_time_unix_nano >= span.span.start_time_unix_nano > 0
        assert span.resource["service.name"] == "authz-server"
    first, second, third = (by_decision(spans, i) for i in ids)
    assert [name for name, _ in first.events] == ["identity", "cache", "policy", "response"]
    assert dict(first.events)["cache"]["authz.cache.hit"] is False
    assert all(attrs["authz.duration_us"] >= 0 for _, attrs in first.events)
    assert dict(second.events)["cache"]["authz.cache.hit"] is True and "policy" not in dict(second.events)
    assert dict(third.events)["cache"].get("authz.cache.repeat") is True  # answered by the repeat path
    rejected = by_decision(spans, denied.dynamic_metadata["decision_id"])
    assert rejected.attributes["authz.allowed"] is False and rejected.attributes["authz.code"] == "policy_denied"
    assert len(rejected.span.parent_span_id) == 0  # no traceparent sent: a root span


async def test_the_http_front_is_traced_too_over_otlp_http(tmp_path: Path, receiver: OtlpReceiver,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    otel_env(monkeypatch, receiver.http_endpoint, "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "authz-edge")
    config = Config(policies=str(write_audit_policy(tmp_path / "policies")), addr="", http_addr="127.0.0.1:0",
                    trust_domains=(TRUST_DOMAIN,))
    header, trace_id, span_id = traceparent()
    async with running_app(config) as app:
        async with httpx.AsyncClient(base_url=f"http://{app.bound['http_addr']}", timeout=10) as client:
            answer = await client.get("/check/public/x", headers={
                "traceparent": header, "tracestate": "vendor=1", "x-forwarded-client-cert": f"URI={workload('web')}"})
        status, decision_id = answer.status_code, answer.headers["x-authz-decision-id"]
        spans = await asyncio.to_thread(receiver.wait_for, lambda got: by_decision(got, decision_id) is not None)
    assert status == 200
    span = by_decision(spans, decision_id)
    assert span is not None and span.resource["service.name"] == "authz-edge"
    assert span.span.trace_id.hex() == trace_id and span.span.parent_span_id.hex() == span_id
    assert span.span.trace_state == "vendor=1"
    assert span.attributes["authz.transport"] == "http" and span.attributes["http.request.method"] == "GET"


async def test_an_unsampled_traceparent_is_not_exported(tmp_path: Path, receiver: OtlpReceiver,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    otel_env(monkeypatch, receiver.grpc_endpoint)
    config = Config(policies=str(write_audit_policy(tmp_path / "policies")), trust_domains=(TRUST_DOMAIN,))
    async with running_app(config) as app:
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = grpc_check(channel)
            skipped = await check(check_request_bytes("/public/a", principal=workload("web"),
                                                      headers={"traceparent": traceparent(sampled=False)[0]}))
            kept = await check(check_request_bytes("/public/b", principal=workload("web"),
                                                   headers={"traceparent": traceparent()[0]}))
        kept_id = kept.dynamic_metadata["decision_id"]
        spans = await asyncio.to_thread(receiver.wait_for, lambda got: by_decision(got, kept_id) is not None)
        assert app.tracing.flush()
        assert app.tracing.unsampled == 1  # dropped before the queue: the SDK would have dropped it
    assert by_decision(receiver.spans(), skipped.dynamic_metadata["decision_id"]) is None
    assert len(spans) >= 1


def test_which_exporters_the_environment_asks_for() -> None:
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == ["otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp, console"}) == ["otlp", "console"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []


def test_an_exporter_that_is_not_installed_or_a_protocol_not_spoken_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as error:
        tracing_from_env({"OTEL_TRACES_EXPORTER": "jaeger-thrift"})
    assert "OTEL_TRACES_EXPORTER" in error.value.message and "otlp" in error.value.message
    with pytest.raises(ConfigError) as error:
        tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert "http/json" in error.value.message


def test_with_no_otel_variable_tracing_is_off_and_the_sdks_tracing_never_loaded(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from authz_server.config import Config\n"
        "from authz_server.server import build_app\n"
        f"app = build_app(Config(policies={str(write_audit_policy(tmp_path / 'p'))!r}, metrics_addr=''))\n"
        "assert app.tracing is None and app.pipeline.tracing is None\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter', "
        "'opentelemetry.propagate'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
