"""A small HTTP/1.1 server on asyncio + httptools, shared by every HTTP face of the product.

The HTTP ext_authz front, the token-exchange endpoint, the dev OIDC provider and the
metrics endpoint all speak plain HTTP/1.1 to well-behaved peers (Envoy, curl, our own
clients). A raw ``asyncio.Protocol`` with the httptools parser is the cheapest way to
serve that from Python: a handler that can answer at once returns the response directly
and no task is created per request; one that must wait returns an awaitable and the
connection answers pipelined requests strictly in order.

Caps on untrusted input (header count and size, body size) answer 431/413 and close.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import ssl as ssl_module
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Union

import httptools

MAX_HEADERS = 200
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024

_REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
    415: "Unsupported Media Type", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str  # the raw request target: path plus query, as sent
    headers: dict[str, str]  # lower-case names; repeated headers joined with ","
    body: bytes = b""
    peer: tuple[str, int] | None = None
    peer_certificate: bytes = b""  # DER of the client certificate TLS verified, if any

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        parts = self.target.split("?", 1)
        return parts[1] if len(parts) == 2 else ""


@dataclass(slots=True)
class HttpResponse:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def encode(self, *, keep_alive: bool = True) -> bytes:
        reason = _REASONS.get(self.status, "Unknown")
        lines = [f"HTTP/1.1 {self.status} {reason}"]
        for name, value in self.headers:
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                continue  # never let a header value split the response
            lines.append(f"{name}: {value}")
        lines.append(f"content-length: {len(self.body)}")
        if not keep_alive:
            lines.append("connection: close")
        head = "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n"
        return head + self.body


def json_response(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    import json

    return HttpResponse(
        status,
        [("content-type", "application/json"), ("cache-control", "no-store"), *(headers or [])],
        json.dumps(payload, separators=(",", ":")).encode(),
    )


Handler = Callable[[HttpRequest], Union[HttpResponse, Awaitable[HttpResponse]]]


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_handler", "_transport", "_parser", "_url", "_headers", "_header_bytes", "_body",
        "_peer", "_queue", "_busy", "_closing", "_last_name", "_peer_certificate",
    )

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._peer: tuple[str, int] | None = None
        self._queue: deque[tuple[Awaitable[HttpResponse], bool]] = deque()
        self._busy = False
        self._closing = False
        self._last_name = ""
        self._peer_certificate = b""

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = peer[:2] if isinstance(peer, tuple) else None
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            self._peer_certificate = tls.getpeercert(binary_form=True) or b""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except _TooLarge as exc:
            self._fail(exc.status)
        except httptools.HttpParserError as exc:  # callback errors arrive wrapped in this
            cause = exc.__cause__ or exc.__context__
            self._fail(cause.status if isinstance(cause, _TooLarge) else 400)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._transport = None

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_HEADER_BYTES:
            raise _TooLarge(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) >= MAX_HEADERS:
            raise _TooLarge(431)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous},{text}"

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._header_bytes += len(body)
        if self._header_bytes > MAX_HEADER_BYTES + MAX_BODY_BYTES:
            raise _TooLarge(413)

    def on_message_complete(self) -> None:
        parser = self._parser
        request = HttpRequest(
            parser.get_method().decode("latin-1"),
            self._url.decode("latin-1"),
            self._headers,
            b"".join(self._body),
            self._peer,
            self._peer_certificate,
        )
        keep_alive = parser.should_keep_alive()
        try:
            result = self._handler(request)
        except Exception:  # a handler bug answers 500, never kills the connection loop
            result = HttpResponse(500, [("content-type", "text/plain")], b"internal error")
        if not self._busy and isinstance(result, HttpResponse):
            self._write(result, keep_alive)
            return
        if isinstance(result, HttpResponse):
            result = _ready(result)
        self._queue.append((result, keep_alive))
        if not self._busy:
            self._busy = True
            asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                pending, keep_alive = self._queue.popleft()
                try:
                    response = await pending if inspect.isawaitable(pending) else pending
                except Exception:
                    response = HttpResponse(500, [("content-type", "text/plain")], b"internal error")
                self._write(response, keep_alive)
        finally:
            self._busy = False

    def _write(self, response: HttpResponse, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(response.encode(keep_alive=keep_alive))
        if not keep_alive:
            self._closing = True
            transport.close()

    def _fail(self, status: int) -> None:
        self._write(HttpResponse(status, [("content-type", "text/plain")], _REASONS.get(status, "").encode()), False)


class _TooLarge(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


async def _ready(response: HttpResponse) -> HttpResponse:
    return response


def bind_socket(address: str, *, reuse_port: bool = False) -> socket.socket:
    """Bind ``host:port`` (port 0 picks a free one) or ``unix:/path``; returns a listening socket."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_http(handler: Handler, address: str, *, reuse_port: bool = False,
                     ssl: "ssl_module.SSLContext | None" = None) -> tuple[asyncio.Server, str]:
    """Start serving ``handler`` on ``address`` (over TLS with ``ssl``); returns the server
    and the bound address."""
    sock = bind_socket(address, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(handler), sock=sock, ssl=ssl)
    if sock.family == socket.AF_UNIX:
        bound = address
    else:
        host, port = sock.getsockname()[:2]
        bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return server, bound
