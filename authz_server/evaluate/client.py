"""A raw HTTP/1.1 client: the request target goes out byte for byte (HTTP libraries normalise
``//``, ``/./`` and ``..`` themselves, which would hide path tricks from Envoy), optionally
over TLS with a client certificate, from a chosen local address.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field


class TlsRefused(Exception):
    """The TLS handshake failed or the server closed the connection before answering."""


@dataclass(slots=True)
class RawResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def client_context(ca_pem: bytes, chain: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verify the server against ``ca_pem`` (SPIFFE certificates name a URI, not a host, so the
    host name is not checked) and present ``chain``/``key`` when given."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.check_hostname = False
    if chain and key:
        context.load_cert_chain(chain, key)
    return context


async def send_raw(host: str, port: int, target: str, *, method: str = "GET",
                   headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                   tls: ssl.SSLContext | None = None, local_address: str | None = None,
                   timeout: float = 10.0) -> RawResponse:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=tls, local_addr=(local_address, 0) if local_address else None,
            server_hostname="" if tls is not None else None), timeout)
    except (ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError) as exc:
        if tls is not None:
            raise TlsRefused(str(exc)) from None
        raise
    try:
        lines = [f"{method} {target} HTTP/1.1", f"host: {host}", "connection: close"]
        lines += [f"{name}: {value}" for name, value in headers or []]
        if body:
            lines.append(f"content-length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        if tls is not None:
            raise TlsRefused(str(exc)) from None
        raise
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ssl.SSLError, ConnectionError):
            pass
    if not data:
        if tls is not None:  # TLS 1.3: a refused client certificate shows as a closed connection
            raise TlsRefused("connection closed before any answer")
        raise ConnectionError("connection closed before any answer")
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding", "").lower() == "chunked":
        payload = _unchunk(payload)
    return RawResponse(int(status_line.split()[1]), parsed, payload)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return bytes(out)
