"""OpenTelemetry traces of decisions: one span per decision, exported by OTLP.

Configured by the standard ``OTEL_*`` environment variables, as the OpenTelemetry SDK reads
them (``setup``); off when none names an exporter or an OTLP endpoint, and then nothing of it
is imported or run. ``DecisionTracer`` (``spans``) gives the pipeline its phase clock and turns
decisions into spans (off the request path, unless making one there costs less), through ``otlp``
(spans encoded by ``wire`` and sent by the SDK's OTLP exporter, ``transport``: the fast path) or
``sdkspans`` (the SDK's own spans, for other exporters); ``attributes`` says what a span may
carry (no secrets). See docs/observability.md.
"""

from __future__ import annotations

from .setup import tracing_configured, tracing_from_env

__all__ = ["tracing_configured", "tracing_from_env"]
