"""Tracing from the standard ``OTEL_*`` environment variables, as the OpenTelemetry SDK reads them.

On when ``OTEL_TRACES_EXPORTER`` names an exporter other than ``none``, or when it is unset and
an OTLP endpoint is given (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``);
off otherwise, and always off with ``OTEL_SDK_DISABLED=true``. Off, nothing here imports the SDK.

On with ``otlp`` alone (the usual case), spans are encoded and exported by ``otlp.OtlpSpans``
through the SDK's OTLP exporter for ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (gRPC or HTTP), with
no SDK span made (a few µs a decision instead of ~150). Otherwise (other or several exporters,
or a sampler, id generator or propagator only the SDK knows) each exporter named is loaded
through the SDK's ``opentelemetry_traces_exporter`` entry points (``otlp`` picks gRPC or HTTP
from the protocol, as the SDK's own auto-configuration does) and wrapped in a
``BatchSpanProcessor``, and ``sdkspans.SdkSpans`` makes SDK spans. Everything else is the
SDK's to read on both paths: endpoints, headers, certificates, compression and timeouts (``OTEL_EXPORTER_OTLP_*``),
the sampler (``OTEL_TRACES_SAMPLER[_ARG]``; parent-based by default, so Envoy's sampling
decision in ``traceparent`` holds), batching (``OTEL_BSP_*``), span limits, the resource
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``; ``service.name`` defaults to
``authz-server``) and the propagators (``OTEL_PROPAGATORS``; W3C trace context and baggage).
The provider is this server's own, never the process-wide global.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ConfigError

if TYPE_CHECKING:
    from .spans import DecisionTracer

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOLS = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The trace exporters the environment asks for (``[]``: tracing is off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = environ.get("OTEL_TRACES_EXPORTER")
    if named is None:
        return ["otlp"] if any(environ.get(key, "").strip() for key in _ENDPOINTS) else []
    return [name for name in (part.strip().lower() for part in named.split(",")) if name and name != "none"]


def tracing_configured(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(exporter_names(environ))


def tracing_from_env(environ: Mapping[str, str] = os.environ, *, sdk_spans: bool = False) -> DecisionTracer | None:
    """A started ``DecisionTracer`` exporting where the environment says, or None when tracing
    is off. A name that no installed exporter answers to is a ``ConfigError``. ``sdk_spans``:
    the SDK's spans even for OTLP alone (the tests and the benchmark compare the two paths)."""
    names = exporter_names(environ)
    if not names:
        return None
    from .sdkspans import SdkSpans
    from .spans import DecisionTracer

    resource = _resource()
    if names == ["otlp"] and not sdk_spans:
        from .otlp import otlp_tracer

        protocol = _protocol(environ)
        try:
            tracer = otlp_tracer(protocol, resource, environ)
        except Exception as exc:  # an exporter that cannot start from this environment (bad certificate path...)
            raise ConfigError(f"the otlp trace exporter cannot start: {exc}", key="OTEL_TRACES_EXPORTER",
                              code="tracing_config_invalid") from None
        if tracer is not None:
            return tracer
    return DecisionTracer(SdkSpans(_provider(names, resource, environ)))


def _resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "authz-server", "service.version": _version()}))
    return resource


def _provider(names: list[str], resource: Any, environ: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_exporter(name, environ) for name in names]
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _protocol(environ: Mapping[str, str]) -> str:
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    if protocol not in _PROTOCOLS:
        raise ConfigError(f"OTLP protocol {protocol!r} is not supported (use {' or '.join(_PROTOCOLS)})",
                          key="OTEL_EXPORTER_OTLP_PROTOCOL", code="tracing_config_invalid")
    return protocol


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    from importlib.metadata import entry_points

    entry = _PROTOCOLS[_protocol(environ)] if name == "otlp" else name
    found = entry_points(group="opentelemetry_traces_exporter", name=entry)
    if not found:
        known = sorted({point.name for point in entry_points(group="opentelemetry_traces_exporter")} | {"none"})
        raise ConfigError(f"no trace exporter named {name!r} is installed (known: {', '.join(known)})",
                          key="OTEL_TRACES_EXPORTER", code="tracing_config_invalid")
    try:
        return next(iter(found)).load()()
    except Exception as exc:  # an exporter that cannot start from this environment (bad certificate path...)
        raise ConfigError(f"the {name} trace exporter cannot start: {exc}", key="OTEL_TRACES_EXPORTER",
                          code="tracing_config_invalid") from None


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("authz-server")
    except metadata.PackageNotFoundError:
        return "unknown"
