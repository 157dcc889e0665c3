"""What one request and one connection may cost: config key ``limits``.

The size caps hold on both fronts, so what one request costs the event loop is bounded
whichever way it came: the request line or path plus the header section (names and values),
the number of headers, and the body. Envoy has its own, smaller defaults for what it sends
(``max_request_headers_kb: 60``, ``max_headers_count: 100``, ``with_request_body.
max_request_bytes``): keep these at or above Envoy's, or Envoy's requests are refused
(``request_too_large``, ``body_too_large``; 431/413 on the HTTP front).

The timeouts and the connection limit are the HTTP front's (gRPC core keeps its own).
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 64 * KIB  # request line or path, and the header section
    max_headers: int = 200
    max_body_bytes: int = 1024 * KIB
    header_timeout: float = 10.0  # HTTP: first byte of a request to the end of its head
    body_timeout: float = 30.0  # HTTP: end of the head to the end of the body
    idle_timeout: float = 60.0  # HTTP: a kept-alive connection with nothing to read or answer
    max_connections: int = 10_000  # HTTP, per process: past it the oldest idle connection is closed

    @property
    def max_request_bytes(self) -> int:
        """A bound on a whole request (what else a CheckRequest carries: addresses,
        certificates, metadata), checked before it is even parsed."""
        return self.max_header_bytes + self.max_body_bytes + 64 * KIB


__all__ = ["Limits"]
