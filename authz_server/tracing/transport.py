"""The SDK's OTLP exporters, sending requests ``wire`` encoded instead of SDK spans.

Everything about the connection stays the SDK's: endpoint, headers, certificates, insecure,
compression and timeout from ``OTEL_EXPORTER_OTLP[_TRACES]_*``, retries with backoff, gRPC
reconnection, the HTTP session. Two small hooks into the exporters (their versions are pinned by
requirements/dev.lock; tests/integration/test_tracing.py sends through both to a real receiver):

* gRPC: ``OTLPExporterMixin`` builds its request with ``_translate_data`` and counts it with
  ``_count_data`` (the abstract methods its subclasses implement): here the request is the
  encoded bytes, and the stub it builds from ``_stub`` (a constructor argument of the mixin,
  reused when it reconnects) sends bytes as they are, with no serializer.
* HTTP: the exporter's ``export`` encodes SDK spans and hands the bytes to its ``_client``
  (the SDK's retrying ``_OTLPHTTPClient``); ``export`` here hands it the encoded bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult


@dataclass(frozen=True)
class EncodedSpans:
    """One ``ExportTraceServiceRequest``, serialized, and how many spans it holds."""

    request: bytes
    count: int


class _BytesTraceServiceStub:
    """``TraceServiceStub`` whose ``Export`` takes the request already serialized."""

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                          request_serializer=None,
                                          response_deserializer=ExportTraceServiceResponse.FromString,
                                          _registered_method=True)


class GrpcEncodedExporter(GrpcSpanExporter):
    """OTLP/gRPC (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._stub = _BytesTraceServiceStub
        self._client = self._stub(self._channel)

    def _translate_data(self, data: EncodedSpans) -> bytes:  # type: ignore[override]
        return data.request

    def _count_data(self, data: EncodedSpans) -> int:  # type: ignore[override]
        return data.count


class HttpEncodedExporter(HttpSpanExporter):
    """OTLP/HTTP with protobuf bodies (see the module docstring)."""

    def export(self, spans: EncodedSpans) -> SpanExportResult:  # type: ignore[override]
        if self._shutdown:
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(spans.count) as result:
            exported = self._client.export(spans.request)
            if not exported.success:
                result.error = exported.error
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


def encoded_exporter(protocol: str) -> GrpcEncodedExporter | HttpEncodedExporter:
    """The exporter for ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (``grpc`` or ``http/protobuf``)."""
    return GrpcEncodedExporter() if protocol == "grpc" else HttpEncodedExporter()
