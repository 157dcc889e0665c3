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

Requests are framed and parsed by ``http`` (one parser per connection: nothing else decides
where a request ends, so none can be smuggled past it), within its ``HttpLimits``.

Fast path: a cached allow for the very same request bytes, once framed by the parser as one
whole request, is answered from its kept rendering without parsing them again (see
``repeats`` and ``http._Server``). Configure Envoy not to send volatile headers
(``disallowed_headers`` in the rendered configs) and most repeat requests hit there.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Callable, Mapping

from .decision import DECISION_ID_HEADER, Decision, Pipeline
from .decisioncache import request_digest
from .errors import RequestError
from .facts import VOLATILE_HEADERS, Facts, Shape, Volatile, with_volatile
from .http import HttpRequest, HttpResponse
from .identity.verified import upstream_removals
from .repeats import RepeatCache
from .trees import project

CONTEXT_HEADER_PREFIX = "x-authz-ctx-"
XFCC = "x-forwarded-client-cert"
# Added by Envoy to the authorization request itself, not sent by the client.
_AUTHZ_REQUEST_ONLY = frozenset({"x-envoy-internal", "x-envoy-expected-rq-timeout-ms", "content-length"})
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"


# -- x-forwarded-client-cert

def parse_xfcc(value: str) -> dict[str, str]:
    """The last element of an XFCC header (the hop our Envoy set) as ``{key: value}``.

    Elements are separated by ``,``, pairs by ``;``; values may be double-quoted and
    contain either separator inside the quotes."""
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    buf: list[str] = []
    key, quoted, escaped = "", False, False
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

    digest = request_digest()
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

    def shape(self, facts: Facts | None = None) -> Shape:
        """``facts.ShapedAttributeSource.shape``: everything ``stable_attributes`` holds but
        the method, path and headers (which it always has). ``facts`` is not read: their
        headers hold the volatile ones too."""
        return ((self.host, self.body, self.raw_body, self.size, self.address, self.principal, self.certificate,
                 tuple(self.context.items())), self.method, self.path,
                {name: value for name, value in self.headers.items() if name not in VOLATILE_HEADERS})


# -- decision → response

def http_response(decision: Decision) -> HttpResponse:
    headers: list[tuple[str, str]] = [(DECISION_ID_HEADER, decision.decision_id)]
    if decision.allowed:
        upstream = decision.upstream_headers
        headers.extend(upstream)
        # One header reaches both sides when Envoy's lists name it for both (x-session-id):
        # sending it twice would give the client "id,id".
        headers.extend(h for h in decision.response_headers if h not in upstream)
        remove = upstream_removals(upstream, decision.headers_to_remove)
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


class HttpFront:
    """Answers Envoy's HTTP ext_authz requests with ``pipeline`` decisions: ``handle`` is the
    ``http.Handler`` that ``serve_http`` calls with each request its parser framed, and
    ``replay`` answers a repeat of one (the same bytes again, see ``http._Server``)."""

    def __init__(self, pipeline: Pipeline, *, path_prefix: str = "/check", clock: Callable[[], float] = time.time,
                 exact_cache_entries: int = 20_000, on_latency: Callable[[float, str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.path_prefix = path_prefix
        self.clock = clock
        self.exact = RepeatCache(exact_cache_entries)  # keyed by HttpRequest.repeat_key
        self.on_latency = on_latency

    def replay(self, key: bytes) -> bytes | None:
        decision = self.exact.replay(key, self.pipeline, self.clock())
        return None if decision is None else http_response_bytes(decision)

    async def handle(self, request: HttpRequest) -> bytes:
        started = time.perf_counter()
        now = self.clock()
        try:
            facts = facts_from_http(request, self.path_prefix)
        except RequestError as exc:
            decision = self.pipeline.refuse(exc, now=now)
        else:
            decision = await self.pipeline.decide(facts, now=now)
            if request.repeat_key is not None:
                self.exact.put(request.repeat_key, decision, facts, len(request.body) + len(request.target))
        response = http_response_bytes(decision)
        if self.on_latency is not None:
            self.on_latency(time.perf_counter() - started, "http")
        return response


__all__ = ["HttpFront", "facts_from_http", "http_response", "parse_xfcc"]
