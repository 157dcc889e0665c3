"""Audit sinks by spec string. Each kind is one module; ``open_sink`` picks by prefix.

A new kind (MongoDB, as the paper used, or Kafka) is one more module with a class that
satisfies ``Sink`` and one more entry in ``SINK_KINDS``: records arrive as ``AuditRecord``
(the document as a dict for databases that store documents, as a JSON line for text).
"""

from __future__ import annotations

from typing import Callable

from ...errors import ConfigError
from .base import Sink, SinkUnavailable

# spec prefix -> factory(spec). Imported lazily so a sink's driver loads only when used.


def _stdout(spec: str) -> Sink:
    from .stdout import StdoutSink

    if spec != "stdout":
        raise ConfigError(f"stdout takes no options, got {spec!r}", key="audit")
    return StdoutSink()


def _file(spec: str) -> Sink:
    from .file import FileSink

    return FileSink.from_spec(spec)


def _postgres(spec: str) -> Sink:
    from .postgres import PostgresSink

    return PostgresSink(spec)


SINK_KINDS: dict[str, Callable[[str], Sink]] = {
    "stdout": _stdout,
    "file:": _file,
    "postgresql://": _postgres,
    "postgres://": _postgres,
}


def open_sink(spec: str) -> Sink:
    """``stdout``, ``file:PATH[?max_bytes=..&keep=..]`` or ``postgresql://...[?table=..]``."""
    for prefix, factory in SINK_KINDS.items():
        if spec.startswith(prefix):
            return factory(spec)
    raise ConfigError(f"unknown sink {spec!r}: use stdout, file:PATH or postgresql://...", key="audit")


__all__ = ["SINK_KINDS", "Sink", "SinkUnavailable", "open_sink"]
