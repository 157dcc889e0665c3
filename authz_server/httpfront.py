"""The HTTP ext_authz front: Envoy's ``http_service`` protocol on the same pipeline.

Envoy sends the original method and path (after ``path_prefix``), the headers its
``allowed_headers`` let through and, when configured, the body. 200 allows: headers in the
answer reach the upstream if Envoy's ``allowed_upstream_headers`` names them, or the client
if ``allowed_client_headers_on_success`` does; ``x-envoy-auth-headers-to-remove`` removes
request headers. Any other status denies with its headers and body.

What gRPC carries as fields arrives here as headers, and is mapped back so policies read
the same input in both modes:

* the peer's SPIFFE ID and certificate from ``x-forwarded-client-cert`` (Envoy with
  ``forward_client_cert_details: SANITIZE_SET`` sets ``URI=`` and ``Cert=``),
* the client address from the last ``x-forwarded-for`` hop (the one our Envoy appended),
* route settings from ``x-authz-ctx-<name>`` headers (``authorization_request.headers_to_add``)
  as ``contextExtensions[<name>]``.

Those transport headers, and the ones Envoy adds only to the authorization request, are
not part of ``input.attributes.request.http.headers``.

Fast path: a cached allow for the very same request bytes is answered straight from the
connection's buffer, with no parsing (see ``repeats``). Configure Envoy not to send volatile
headers (``disallowed_headers`` in the rendered configs) and most repeat requests hit there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from typing import Any, Awaitable, Callable, Mapping

import httptools

from .decision import DECISION_ID_HEADER, Decision, Pipeline
from .errors import RequestError
from .facts import VOLATILE_HEADERS, Facts, Volatile, with_volatile
from .policy.inputs import project
from .repeats import RepeatCache
from .http import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_HEADERS, HttpRequest, HttpResponse, bind_socket

log = logging.getLogger("authz_server.httpfront")

CONTEXT_HEADER_PREFIX = "x-authz-ctx-"
XFCC = "x-forwarded-client-cert"
# Added by Envoy to the authorization request itself, not sent by the client.
_AUTHZ_REQUEST_ONLY = frozenset({"x-envoy-internal", "x-envoy-expected-rq-timeout-ms", "content-length"})
IDENTITY_HEADERS = ("x-authz-subject", "x-authz-spiffe-id")
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"


# -- x-forwarded-client-cert

def parse_xfcc(value: str) -> dict[str, str]:
    """The last element of an XFCC header (the hop our Envoy set) as ``{key: value}``.

    Elements are separated by ``,``, pairs by ``;``; values may be double-quoted and
    contain either separator inside the quotes."""
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key, buf, quoted, escaped = "", [], False, False
    reading_key = True

    def flush_pair() -> None:
        nonlocal key, buf, reading_key
        if key:
            current[key.strip().lower()] = "".join(buf)
        key, buf, reading_key = "", [], True

    for ch in value:
        if quoted:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"' and not reading_key:
            quoted = True
        elif ch == "=" and reading_key:
            key, reading_key = "".join(buf), False
            buf = []
        elif ch == ";":
            flush_pair()
        elif ch == ",":
            flush_pair()
            elements.append(current)
            current = {}
        else:
            buf.append(ch)
    flush_pair()
    elements.append(current)
    return elements[-1]


# -- request → facts

def _client_address(headers: Mapping[str, str]) -> str:
    forwarded = headers.get("x-forwarded-for", "")
    return forwarded.rsplit(",", 1)[-1].strip() if forwarded else ""


def facts_from_http(request: HttpRequest, path_prefix: str) -> Facts:
    target = request.target
    if path_prefix and target.startswith(path_prefix):
        target = target[len(path_prefix):] or "/"
    if not target.startswith("/"):
        raise RequestError("the request target is not a path", code="bad_path")
    headers: dict[str, str] = {}
    context: dict[str, str] = {}
    for name, value in request.headers.items():
        if name.startswith(CONTEXT_HEADER_PREFIX):
            context[name[len(CONTEXT_HEADER_PREFIX):]] = value
        elif name not in _AUTHZ_REQUEST_ONLY and name != XFCC:
            headers[name] = value
    xfcc = parse_xfcc(request.headers[XFCC]) if XFCC in request.headers else {}
    principal = xfcc.get("uri", "")
    certificate = xfcc.get("cert", "")
    body_bytes = request.body
    try:
        body = body_bytes.decode("utf-8")
        raw_body = b""
    except UnicodeDecodeError:
        body, raw_body = "", body_bytes  # as Envoy's gRPC mode would with pack_as_bytes
    if body_bytes and "content-length" in request.headers:
        headers["content-length"] = request.headers["content-length"]
    host = headers.get("host", "")
    method = request.method
    address = _client_address(headers)

    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{method}\0{target}\0{principal}\0{certificate}\0".encode("utf-8", "surrogateescape"))
    for name in sorted(request.headers):
        if name not in VOLATILE_HEADERS and name != XFCC:  # as in gRPC mode
            digest.update(f"{name}\0{request.headers[name]}\0".encode("utf-8", "surrogateescape"))
    digest.update(body_bytes)

    return Facts(
        method=method, path=target, headers=headers, body=body, raw_body=raw_body, host=host,
        source_address=address, source_principal=principal, source_certificate=certificate,
        context_extensions=context, request_id=headers.get("x-request-id", ""), fingerprint=digest.digest(),
        transport="http", attributes_factory=_HttpAttributes(
            method, target, host, headers, body, raw_body, len(body_bytes), address, principal, certificate, context),
    )


class _HttpAttributes:
    """``Facts.attributes_factory`` for the HTTP front: the gRPC mode's attributes, as far as
    Envoy's HTTP ext_authz request carries them. Built only when asked for (a cached
    decision never asks)."""

    __slots__ = ("method", "path", "host", "headers", "body", "raw_body", "size", "address", "principal",
                 "certificate", "context")

    def __init__(self, method: str, path: str, host: str, headers: Mapping[str, str], body: str, raw_body: bytes,
                 size: int, address: str, principal: str, certificate: str, context: Mapping[str, str]) -> None:
        self.method, self.path, self.host, self.headers = method, path, host, headers
        self.body, self.raw_body, self.size, self.address = body, raw_body, size, address
        self.principal, self.certificate, self.context = principal, certificate, context

    def __call__(self, tree: Mapping[str, Any] | None = None) -> dict[str, Any]:
        document = with_volatile(self.stable_attributes(), self.volatile)
        return document if tree is None else project(document, dict(tree))

    @property
    def volatile(self) -> Volatile:
        return Volatile(request_id=self.headers.get("x-request-id", ""),
                        headers={name: value for name, value in self.headers.items() if name in VOLATILE_HEADERS})

    def stable_attributes(self) -> dict[str, Any]:
        http: dict[str, Any] = {
            "method": self.method, "path": self.path, "host": self.host, "protocol": "HTTP/1.1",
            "headers": {name: value for name, value in self.headers.items() if name not in VOLATILE_HEADERS},
        }
        if self.body:
            http["body"] = self.body
        if self.raw_body:
            http["rawBody"] = base64.b64encode(self.raw_body).decode("ascii")
        if self.size:
            http["size"] = self.size
        source: dict[str, Any] = {}
        if self.address:
            source["address"] = {"socketAddress": {"address": self.address}}
        if self.principal:
            source["principal"] = self.principal
        if self.certificate:
            source["certificate"] = self.certificate
        document: dict[str, Any] = {"request": {"http": http}}
        if source:
            document["source"] = source
        if self.context:
            document["contextExtensions"] = dict(self.context)
        return document


# -- decision → response

def http_response(decision: Decision) -> HttpResponse:
    headers: list[tuple[str, str]] = [(DECISION_ID_HEADER, decision.decision_id)]
    if decision.allowed:
        upstream = decision.upstream_headers
        headers.extend(upstream)
        # One header reaches both sides when Envoy's lists name it for both (x-session-id):
        # sending it twice would give the client "id,id".
        headers.extend(h for h in decision.response_headers if h not in upstream)
        ours = {name for name, _ in upstream}
        remove = list(dict.fromkeys([*decision.headers_to_remove, *(h for h in IDENTITY_HEADERS if h not in ours)]))
        if remove:
            headers.append((HEADERS_TO_REMOVE, ",".join(remove)))
        return HttpResponse(200, headers, b"")
    headers.extend(decision.response_headers)
    return HttpResponse(decision.http_status, headers, decision.body.encode("utf-8"))


def http_response_bytes(decision: Decision) -> bytes:
    """Serialized answer; a cached allow reuses its rendering (see ``Decision.memo``)."""
    memo = decision.memo
    if memo is None or not decision.allowed:
        return http_response(decision).encode()
    template = memo.get("http")
    if template is None:
        rendered = http_response(decision)
        rendered.headers = rendered.headers[1:]  # everything but the decision id
        template = memo["http"] = rendered.encode()
    # The id header goes right after the status line of the memoized response.
    split = template.index(b"\r\n") + 2
    return b"".join((template[:split], DECISION_ID_HEADER.encode(), b": ", decision.decision_id.encode(), b"\r\n",
                     template[split:]))


def repeat_key(raw: bytes) -> bytes:
    """The ``RepeatCache`` key of a request: a digest of its bytes, exactly as they came."""
    return hashlib.blake2b(raw, digest_size=20).digest()


# -- the protocol

_Respond = Callable[[bytes], None]


class _Message:
    """httptools callbacks collecting one request."""

    __slots__ = ("url", "headers", "body", "count", "size", "done")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.count = 0
        self.size = 0
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        self.size += len(name) + len(value)
        if self.count > MAX_HEADERS or self.size > MAX_HEADER_BYTES:
            raise RequestError("too many or too large headers", code="request_too_large")
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")
        previous = self.headers.get(key)
        self.headers[key] = text if previous is None else f"{previous},{text}"

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_HEADER_BYTES + MAX_BODY_BYTES:
            raise RequestError("request body too large", code="request_too_large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class HttpFront:
    """Answers Envoy's HTTP ext_authz requests with ``pipeline`` decisions."""

    def __init__(self, pipeline: Pipeline, *, path_prefix: str = "/check", clock: Callable[[], float] = time.time,
                 exact_cache_entries: int = 20_000, on_latency: Callable[[float, str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.path_prefix = path_prefix
        self.clock = clock
        self.exact = RepeatCache(exact_cache_entries)  # keyed by a digest of the request bytes
        self.on_latency = on_latency

    def answer_cached(self, raw: bytes, now: float) -> bytes | None:
        decision = self.exact.replay(repeat_key(raw), self.pipeline, now)
        return None if decision is None else http_response_bytes(decision)

    async def answer(self, raw: bytes, now: float) -> bytes:
        started = time.perf_counter()
        message = _Message()
        parser = httptools.HttpRequestParser(message)
        try:
            parser.feed_data(raw)
            if not message.done:
                raise RequestError("incomplete HTTP request", code="malformed_request")
            request = HttpRequest(parser.get_method().decode("latin-1"), message.url.decode("latin-1"),
                                  message.headers, b"".join(message.body))
            facts = facts_from_http(request, self.path_prefix)
        except RequestError as exc:
            decision = self.pipeline.refuse(exc, now=now)
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            error = cause if isinstance(cause, RequestError) else RequestError(
                f"malformed HTTP request: {exc}", code="malformed_request")
            decision = self.pipeline.refuse(error, now=now)
        else:
            decision = await self.pipeline.decide(facts, now=now)
            self.exact.put(repeat_key(raw), decision, facts, len(raw))
        response = http_response_bytes(decision)
        if self.on_latency is not None:
            self.on_latency(time.perf_counter() - started, "http")
        return response

    def protocol(self) -> asyncio.Protocol:
        return _FrontProtocol(self)


class _FrontProtocol(asyncio.Protocol):
    """Frames requests from the byte stream itself (Envoy sends ``content-length`` bodies),
    so a repeat request can be answered before any parsing."""

    __slots__ = ("_front", "_transport", "_buffer", "_queue", "_busy")

    def __init__(self, front: HttpFront) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._queue: list[Awaitable[bytes] | bytes] = []
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        front = self._front
        while buffer:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    self._fail(431)
                    return
                break
            length = _content_length(buffer, end)
            if length is None:
                self._fail(400)  # chunked or unparsable framing: Envoy never sends that
                return
            if length > MAX_BODY_BYTES:
                self._fail(413)
                return
            total = end + 4 + length
            if len(buffer) < total:
                break
            raw, buffer = buffer[:total], buffer[total:]
            now = front.clock()
            if not self._busy and not self._queue:
                fast = front.answer_cached(raw, now)
                if fast is not None:
                    self._write(fast)
                    continue
            self._queue.append(front.answer(raw, now))
            if not self._busy:
                self._busy = True
                asyncio.ensure_future(self._drain())
        self._buffer = buffer

    async def _drain(self) -> None:
        try:
            while self._queue:
                pending = self._queue.pop(0)
                try:
                    response = pending if isinstance(pending, bytes) else await pending
                except Exception:  # a bug answers 500 (Envoy denies), never kills the connection
                    log.exception("HTTP ext_authz request failed")
                    response = HttpResponse(500, [("content-type", "text/plain")], b"internal error").encode()
                self._write(response)
        finally:
            self._busy = False

    def _write(self, response: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(response)

    def _fail(self, status: int) -> None:
        self._write(HttpResponse(status, [("content-type", "text/plain")], b"bad request").encode(keep_alive=False))
        if self._transport is not None:
            self._transport.close()


def _content_length(buffer: bytes, end: int) -> int | None:
    head = buffer[:end].lower()
    if b"\r\ntransfer-encoding:" in head:
        return None
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = head.find(b"\r\n", at + 2)
    value = head[at + 17: stop if stop >= 0 else len(head)].strip()
    return int(value) if value.isdigit() else None


async def serve_http_front(front: HttpFront, address: str, *, reuse_port: bool = False) -> tuple[asyncio.Server, str]:
    sock = bind_socket(address, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(front.protocol, sock=sock)
    if address.startswith("unix:"):
        return server, address
    host, port = sock.getsockname()[:2]
    return server, f"{host}:{port}"


__all__ = ["HttpFront", "facts_from_http", "http_response", "parse_xfcc", "serve_http_front"]
