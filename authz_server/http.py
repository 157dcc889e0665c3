"""A small HTTP/1.1 server on asyncio + httptools, shared by every HTTP face of the product.

The HTTP ext_authz front, the token-exchange endpoint, the dev OIDC provider and the
metrics endpoint all speak HTTP/1.1 on sockets anyone may reach. A raw ``asyncio.Protocol``
with the httptools parser (llhttp, Node's) is the cheapest way to serve that from Python: a
handler that can answer at once returns the response directly and no task is created per
request; one that must wait returns an awaitable, and the connection answers pipelined
requests strictly in order.

Hostile peers are expected, so every connection holds these lines (``limits.Limits``):

* **Framing is the parser's alone.** One parser per connection reads every byte, and a
  request is what it framed: nothing else looks for where a request ends. llhttp in its
  strict mode refuses what RFC 9112 §6.3 calls ambiguous (duplicate or differing
  ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``, a ``Transfer-Encoding``
  that does not end in ``chunked``, whitespace before the colon, obs-fold, bare CR or LF).
  Upgrades (``Upgrade``, ``CONNECT``, the HTTP/2 preface), HTTP versions other than 1.0
  and 1.1, an HTTP/1.1 request without one ``Host`` and an HTTP/1.0 one with
  ``Transfer-Encoding`` (RFC 9112 §3.2, §6.1) are refused too, and trailers are read but
  never become headers; a transfer coding other than ``chunked`` alone is a 501. A fuzz test
  holds this framing to h11's. A refused
  request is answered 4xx with ``connection: close``, and the connection closes: after a
  framing error nothing that follows on it can be trusted.
* **Caps whatever the reads:** the request line and header section (``max_header_bytes``,
  counted over the bytes the parser reports and over every read while a head is incomplete)
  and header count (431; 414 for the target alone), the body (413, refused on a declared
  ``Content-Length`` before it is read), and requests read ahead of their answers (a
  client that pipelines more than ``MAX_PIPELINED`` is paused, more than ``MAX_QUEUED``
  refused with 429).
* **Timeouts:** a head must arrive within ``header_timeout`` of its first byte and a body
  within ``body_timeout`` of its head (408, close: slowloris), and a connection idle for
  ``idle_timeout`` between requests is closed. One sweep per server checks them every
  ``SWEEP_INTERVAL`` seconds, so a request costs no timer of its own.
* **A limit on connections:** past ``max_connections``, the oldest idle connection is
  closed to make room, or, with none idle, the new one is answered 503 and closed.
* A client that does not read its answers stops being read (transport flow control).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import socket
import ssl as ssl_module
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Union

import httptools

from .errors import where_it_failed
from .limits import Limits

log = logging.getLogger("authz_server.http")

MAX_PIPELINED = 32  # answers pending before the connection stops reading
MAX_QUEUED = 128  # answers pending, reached within one read: the client is refused
SWEEP_INTERVAL = 0.5  # seconds between timeout checks

_REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str  # the raw request target: path plus query, as sent
    headers: dict[str, str]  # lower-case names; values as UTF-8; repeated headers joined with ","
    body: bytes = b""
    peer: tuple[str, int] | None = None
    peer_certificate: bytes = b""  # DER of the client certificate TLS verified, if any
    repeat_key: bytes | None = None  # set when the request came as one whole read: see _Server.replay

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


# A handler answers with a response, or with the bytes of one already encoded (kept alive).
Answer = Union[HttpResponse, bytes]
Handler = Callable[[HttpRequest], Union[Answer, Awaitable[Answer]]]


def _internal_error(exc: Exception) -> HttpResponse:
    log.error("HTTP handler failed: %s", where_it_failed(exc))
    return HttpResponse(500, [("content-type", "text/plain")], b"internal error")


class RequestRefused(Exception):
    """A request the connection answers itself with ``status``, then closes."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Server:
    """The connections of one listening socket: their limit and their timeouts.

    ``replay``, when given, answers a request that comes as exactly the bytes of one read
    the parser once framed as one whole request, kept-alive, on a connection with nothing
    else pending (``HttpRequest.repeat_key`` is the digest of those bytes): from the same
    fresh state, the same bytes are the same request, so they need not be parsed again.
    ``now`` is the loop's clock as of the last sweep: timeouts need no finer reading."""

    def __init__(self, handler: Handler, limits: Limits,
                 replay: Callable[[bytes], bytes | None] | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.replay = replay
        self.connections: dict[_Connection, None] = {}  # oldest first
        self.now = asyncio.get_running_loop().time()
        self._sweeping: asyncio.TimerHandle | None = None

    def protocol(self) -> "_Connection":
        return _Connection(self)

    def admit(self, connection: "_Connection") -> bool:
        """Room for ``connection``, made by closing the oldest idle one if need be."""
        if len(self.connections) >= self.limits.max_connections:
            oldest_idle = next((c for c in self.connections if c.idle), None)
            if oldest_idle is None:
                return False
            oldest_idle.close()
            self.connections.pop(oldest_idle, None)
        self.connections[connection] = None
        if self._sweeping is None:
            loop = asyncio.get_running_loop()
            self.now = loop.time()
            self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep)
        return True

    def forget(self, connection: "_Connection") -> None:
        self.connections.pop(connection, None)

    def _sweep(self) -> None:
        self._sweeping = None
        if not self.connections:
            return
        loop = asyncio.get_running_loop()
        now = self.now = loop.time()
        for connection in list(self.connections):
            connection.check_deadline(now)
        self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep)


_IDLE, _HEAD, _BODY = 0, 1, 2  # what a connection is reading


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_server", "_limits", "_transport", "_parser", "_url", "_headers", "_header_count", "_head_bytes",
        "_raw_head", "_body", "_body_bytes", "_trailers", "_peer", "_peer_certificate", "_queue", "_busy",
        "_closing", "_phase", "_since", "_ready", "_paused",
    )

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._limits = server.limits
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._head_bytes = 0  # of the current head, as the parser reported it
        self._raw_head = 0  # of the current head, as read
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._trailers = False
        self._peer: tuple[str, int] | None = None
        self._peer_certificate = b""
        self._queue: deque[tuple[Answer | Awaitable[Answer], bool]] = deque()
        self._busy = False  # a task is writing the queued answers
        self._closing = False  # nothing more is read: the connection closes once its answers are out
        self._phase = _IDLE
        self._since = server.now
        self._ready: list[tuple[HttpRequest, bool]] = []  # framed in the current read, not yet handled
        self._paused = False

    @property
    def idle(self) -> bool:
        """Between requests with nothing left to answer."""
        return self._phase == _IDLE and not self._busy and not self._queue

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if not self._server.admit(self):
            self._refuse(503)
            return
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
        server = self._server
        fresh = self._phase == _IDLE and not self._busy and not self._queue
        key = None
        if fresh and server.replay is not None:
            # A read the parser once framed as exactly one whole request, from the same fresh
            # state, frames the same way again: answered without parsing it again.
            key = hashlib.blake2b(data, digest_size=20).digest()
            answer = server.replay(key)
            if answer is not None:
                self._transport.write(answer)  # type: ignore[union-attr]
                self._since = server.now
                return
        refused = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # callback errors arrive wrapped in this
            cause = exc.__cause__ or exc.__context__
            refused = cause.status if isinstance(cause, RequestRefused) else 400
        ready, self._ready = self._ready, []
        whole = len(ready) == 1 and fresh and not refused and self._phase == _IDLE
        for request, keep_alive in ready:
            if whole and keep_alive:
                request.repeat_key = key
            self._dispatch(request, keep_alive)
        if refused:
            if not self._closing:
                self._refuse(refused)
        elif self._phase == _HEAD and not self._closing:
            # A head still incomplete after this read: every byte of it counts, including the
            # ones the parser holds back (a header value it is still collecting).
            self._raw_head = self._head_bytes if ready else self._raw_head + len(data)
            if self._raw_head > self._limits.max_header_bytes:
                self._refuse(431)

    def eof_received(self) -> bool:
        """The client will send nothing more: answer what it sent, then close."""
        self._closing = True
        if self._busy or self._queue:
            return True  # _drain closes once the answers are out
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._transport = None
        self._server.forget(self)

    def pause_writing(self) -> None:  # the client is not reading its answers: stop reading its requests
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._paused:
            self._transport.resume_reading()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self._closing:  # a request after one that closes the connection: never read
            raise RequestRefused(400)
        self._url = b""
        self._headers = {}
        self._header_count = 0
        self._head_bytes = 0
        self._raw_head = 0
        self._body = []
        self._body_bytes = 0
        self._trailers = False
        self._phase = _HEAD
        self._since = self._server.now

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_header_bytes:
            raise RequestRefused(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_bytes > self._limits.max_header_bytes:
            raise RequestRefused(431)
        if self._trailers:
            return  # a trailer never becomes a header (RFC 9110 §6.5.1)
        self._header_count += 1
        if self._header_count > self._limits.max_headers:
            raise RequestRefused(431)
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")  # what is sent today; any byte survives
        previous = self._headers.get(key)
        if previous is None:
            self._headers[key] = text
        elif key == "host":  # RFC 9112 §3.2: more than one Host is a 400
            raise RequestRefused(400)
        else:
            self._headers[key] = f"{previous},{text}"

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser.should_upgrade():  # Upgrade, CONNECT: what follows would not be HTTP/1.1
            raise RequestRefused(400)
        version = parser.get_http_version()
        if version == "1.1":
            if "host" not in self._headers:  # RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400
                raise RequestRefused(400)
        elif version == "1.0":
            if "transfer-encoding" in self._headers:  # RFC 9112 §6.1: faulty framing in HTTP/1.0
                raise RequestRefused(400)
        else:
            raise RequestRefused(505)
        coding = self._headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":  # gzip, chunked: a coding not undone here
            raise RequestRefused(501)  # RFC 9112 §6.1
        declared = self._headers.get("content-length")  # one, all digits: llhttp refuses anything else
        if declared is not None and int(declared) > self._limits.max_body_bytes:
            raise RequestRefused(413)
        self._trailers = True
        self._phase = _BODY
        self._since = self._server.now

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise RequestRefused(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        self._phase = _IDLE
        self._since = self._server.now
        request = HttpRequest(
            parser.get_method().decode("latin-1"),
            self._url.decode("latin-1"),
            self._headers,
            b"".join(self._body) if len(self._body) != 1 else self._body[0],
            self._peer,
            self._peer_certificate,
        )
        keep_alive = parser.should_keep_alive()
        if not keep_alive:
            self._closing = True  # anything after this request is not read
        self._ready.append((request, keep_alive))
        if len(self._ready) + len(self._queue) > MAX_QUEUED:
            raise RequestRefused(429)

    def _dispatch(self, request: HttpRequest, keep_alive: bool) -> None:
        try:
            answer = self._server.handler(request)
        except Exception as exc:  # a handler bug answers 500, never kills the connection loop
            answer = _internal_error(exc)
        if not self._busy and not self._queue and (type(answer) is bytes or isinstance(answer, HttpResponse)):
            self._write(answer, keep_alive)  # type: ignore[arg-type]
            return
        self._queue.append((answer, keep_alive))
        if len(self._queue) >= MAX_PIPELINED and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        if not self._busy:
            self._busy = True
            asyncio.ensure_future(self._drain())

    # -- answers
    async def _drain(self) -> None:
        try:
            while self._queue:
                pending, keep_alive = self._queue.popleft()
                try:
                    answer = await pending if inspect.isawaitable(pending) else pending
                except Exception as exc:
                    answer = _internal_error(exc)
                self._write(answer, keep_alive)
                if self._paused and len(self._queue) < MAX_PIPELINED // 2 and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
        finally:
            self._busy = False
            if self._phase == _IDLE:
                self._since = self._server.now  # idle from the last answer on
            if self._closing and not self._queue:
                self.close()

    def _write(self, answer: Answer, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if isinstance(answer, HttpResponse):
            transport.write(answer.encode(keep_alive=keep_alive))
        elif keep_alive:
            transport.write(answer)
        else:  # encoded to be kept alive: say it closes (RFC 9112 §9.6)
            split = answer.index(b"\r\n") + 2
            transport.writelines((answer[:split], b"connection: close\r\n", answer[split:]))
        if not keep_alive:
            self.close()

    def _refuse(self, status: int) -> None:
        """Answer ``status`` after whatever is already being answered, and close."""
        self._closing = True
        response = HttpResponse(status, [("content-type", "text/plain")], _REASONS.get(status, "").encode())
        if self._busy or self._queue:
            self._queue.append((response, False))
        else:
            self._write(response, False)

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def check_deadline(self, now: float) -> None:
        """The sweep's question: has this connection taken too long at what it is doing?"""
        if self._closing:
            return
        if self._phase == _HEAD:
            if now - self._since > self._limits.header_timeout:
                self._refuse(408)
        elif self._phase == _BODY:
            if now - self._since > self._limits.body_timeout:
                self._refuse(408)
        elif self.idle and now - self._since > self._limits.idle_timeout:
            self.close()


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
                     ssl: "ssl_module.SSLContext | None" = None, limits: Limits | None = None,
                     replay: Callable[[bytes], bytes | None] | None = None) -> tuple[asyncio.Server, str]:
    """Start serving ``handler`` on ``address`` (over TLS with ``ssl``) within ``limits``,
    answering repeats with ``replay`` (see ``_Server``); returns the server and the bound
    address."""
    sock = bind_socket(address, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    connections = _Server(handler, limits or Limits(), replay)
    server = await loop.create_server(connections.protocol, sock=sock, ssl=ssl)
    if sock.family == socket.AF_UNIX:
        bound = address
    else:
        host, port = sock.getsockname()[:2]
        bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return server, bound
