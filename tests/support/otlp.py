"""A real OTLP trace receiver on loopback, for the tests and the benchmark: gRPC
(``opentelemetry.proto.collector.trace.v1.TraceService/Export``) and HTTP (``POST /v1/traces``,
protobuf), both built on the ``opentelemetry-proto`` messages. It keeps every span it receives.

    python -m tests.support.otlp   # one that counts spans, in a process of its own (the benchmark's)
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    span: Any  # opentelemetry.proto.trace.v1.Span
    resource: dict[str, Any]
    raw: bytes  # the span as it came over the wire (for looking for secrets)
    scope: Any = None  # opentelemetry.proto.common.v1.InstrumentationScope
    resource_spans: Any = None  # the ResourceSpans it came in, without its scope_spans

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: _value(kv.value) for kv in self.span.attributes}

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [(event.name, {kv.key: _value(kv.value) for kv in event.attributes}) for event in self.span.events]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class OtlpReceiver:
    """Start with ``with OtlpReceiver() as receiver``; ``grpc_endpoint`` and ``http_endpoint``
    are what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep  # False: only count (a benchmark's long runs)
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0
        self.count = 0
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self._keep), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._keep(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self._http.server_address[1]

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> "OtlpReceiver":
        self._grpc.start()
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def _keep(self, request: Any) -> None:
        if not self.keep:
            count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with self._lock:
                self.count += count
                self.requests += 1
            return
        received = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            outer = type(resource_spans)(resource=resource_spans.resource, schema_url=resource_spans.schema_url)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(span, resource, span.SerializeToString(), scope_spans.scope, outer))
        with self._lock:
            self._spans.extend(received)
            self.count += len(received)
            self.requests += 1

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, check: Callable[[list[ReceivedSpan]], bool], *, timeout: float = 30.0,
                 what: str = "spans") -> list[ReceivedSpan]:
        """The spans received once ``check`` holds for them (blocking; use ``asyncio.to_thread``)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if check(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; have {len(spans)} spans")
            time.sleep(0.02)


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, keep: Callable[[Any], None]) -> None:
        self._keep = keep

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the proto's name)
        self._keep(request)
        return trace_service_pb2.ExportTraceServiceResponse()


if __name__ == "__main__":
    # Counts only; each line on stdin is answered with the count so far (the benchmark's readiness
    # and progress checks).
    with OtlpReceiver(keep=False) as running:
        print(json.dumps({"grpc": running.grpc_port, "http": running.http_port}), flush=True)
        for _ in sys.stdin:
            print(running.count, flush=True)
