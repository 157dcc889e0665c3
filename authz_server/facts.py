"""What one request is, as plain data, and the OPA-Envoy input document built from it.

``Facts`` is transport-neutral: the gRPC front fills it from a ``CheckRequest``, the HTTP
front from Envoy's HTTP ext_authz request. ``build_input`` turns facts plus the verified
identity and the signals into exactly the document the OPA-Envoy plugin gives its policies
(``envoyauth/request.go`` ``RequestToInput``): ``attributes`` in protobuf JSON names,
``parsed_path``, ``parsed_query``, ``parsed_body``, ``truncated_body``, ``version`` and
``source_principal``; our own additions only under ``identity`` and ``signals``.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from .errors import RequestError
from .trees import project

INPUT_VERSION = {"ext_authz": "v3", "encoding": "protojson"}

# Headers whose value differs on every request (ids, tracing) and that no sane policy
# decides on: left out of the decision-cache key, or the cache would never hit.
VOLATILE_HEADERS = frozenset({
    "x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
    "x-b3-sampled", "x-b3-flags", "x-ot-span-context", "uber-trace-id", "x-amzn-trace-id",
    "x-cloud-trace-context", "x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-sampling-priority",
    "grpc-trace-bin", "x-envoy-expected-rq-timeout-ms", "x-envoy-attempt-count",
})
# Every per-request part of ``input.attributes`` that ``Facts.fingerprint`` leaves out. A
# policy that names one of them (``input.attributes.source.address.socketAddress.portValue``)
# is keyed on it too: see ``policy.loader.ActivePolicy.volatile_tree``.
VOLATILE_ATTRIBUTES: dict[str, Any] = {
    "request": {"http": {"id": True, "headers": dict.fromkeys(sorted(VOLATILE_HEADERS), True)}, "time": True},
    "source": {"address": {"socketAddress": {"portValue": True}}},
}


@dataclass(slots=True)
class Volatile:
    """The per-request values of ``input.attributes`` that ``Facts.fingerprint`` leaves out.
    Never changed once made; not ``frozen``, whose ``__init__`` costs every check 0.4 µs more."""

    request_id: str = ""
    time_value: tuple[int, int] | None = None  # (seconds, nanos)
    port: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)


def request_time(time_value: tuple[int, int]) -> dict[str, int]:
    """``input.attributes.request.time`` of a ``Volatile.time_value``, as OPA-Envoy has it:
    ``seconds`` and ``nanos``, each left out when zero (the audit log renders it per record)."""
    seconds, nanos = time_value
    if seconds and nanos:
        return {"seconds": seconds, "nanos": nanos}
    if seconds:
        return {"seconds": seconds}
    return {"nanos": nanos} if nanos else {}


def with_volatile(document: dict[str, Any], volatile: Volatile) -> dict[str, Any]:
    """``document`` (attributes without their volatile values) with ``volatile`` put where
    OPA-Envoy has them. ``document`` is left as it is: the dicts on the way are copies."""
    request_id, time_value, headers, port = volatile.request_id, volatile.time_value, volatile.headers, volatile.port
    if not (request_id or time_value is not None or headers or port):
        return document
    document = dict(document)
    if request_id or time_value is not None or headers:
        request = document["request"] = dict(document.get("request", {}))
        http = request["http"] = dict(request.get("http", {}))
        if request_id:
            http["id"] = request_id
        if headers:
            http["headers"] = {**http.get("headers", {}), **headers}
        if time_value is not None:
            request["time"] = request_time(time_value)
    if port:
        source = document["source"] = dict(document.get("source", {}))
        address = source["address"] = dict(source.get("address", {}))
        address["socketAddress"] = {**address.get("socketAddress", {}), "portValue": port}
    return document


class AttributeSource(Protocol):
    """How a front gives ``input.attributes`` without building it until asked (a cached
    decision never asks): a plain dict of plain values, built from whatever the front read
    the request from. The core calls this and nothing else of the front; the fronts own
    their protobuf or HTTP request (``envoy._AttributesAsSent``, ``httpfront._HttpAttributes``)."""

    def __call__(self, tree: Mapping[str, Any] | None = None) -> dict[str, Any]: ...


class StableAttributeSource(AttributeSource, Protocol):
    """One that can also tell the volatile values apart (``stable_input``)."""

    volatile: Volatile | None

    def stable_attributes(self) -> dict[str, Any]: ...


# (key, method, path, headers): see ``ShapedAttributeSource.shape``.
Shape = tuple[Any, str, str, Mapping[str, str]]


class ShapedAttributeSource(StableAttributeSource, Protocol):
    """One that can also tell apart what changes from request to request in traffic that
    does not repeat (an id in the path, a query string, a user's header) from the rest."""

    def shape(self, facts: "Facts | None" = None) -> Shape | None:
        """``(key, method, path, headers)``: ``stable_attributes()`` is a function of ``key``
        (hashable: everything else in them, which fields are present included) and of the
        method, path and headers (without the volatile ones, in the order the attributes list
        them) found at ``request.http``. None when they cannot be told apart. Requests of one
        shape (one route's traffic through one proxy) share all but those three, so the audit
        log redacts and renders the rest once per shape rather than once per request.
        ``facts``: the facts this source belongs to, from which a source may take what it read
        into them rather than read it again."""
        ...


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_DECIMAL = re.compile(r"[+-]?[0-9]+\Z")


@dataclass(slots=True, eq=False, kw_only=True)
class Facts:
    """One request to authorize. ``attributes`` (the OPA-Envoy ``input.attributes``) is
    built lazily: a cached decision never needs it. An ``attributes_factory`` that can tell
    the two apart also offers ``stable_attributes()`` (everything but the volatile values: a
    function of ``fingerprint`` alone) and ``volatile`` (a ``Volatile``), so what depends
    only on the fingerprint can be kept across requests (the audit log does)."""

    method: str
    path: str  # as Envoy routes it: path plus query
    headers: Mapping[str, str]
    body: str = ""
    raw_body: bytes = b""
    host: str = ""
    source_address: str = ""
    source_port: int = 0
    source_principal: str = ""  # the peer's SPIFFE ID, as Envoy's mTLS saw it
    source_certificate: str = ""  # URL-encoded PEM, when Envoy forwards it
    context_extensions: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    fingerprint: bytes = b""  # digest of every non-volatile part of the request
    transport: str = "grpc"
    attributes_factory: AttributeSource | None = None
    _attributes: dict[str, Any] | None = None

    def attributes(self, tree: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``input.attributes``; with ``tree``, only the parts it names (not kept)."""
        factory = self.attributes_factory
        if tree is not None and self._attributes is None:
            return factory(tree) if factory is not None else {}
        if self._attributes is None:
            self._attributes = factory() if factory is not None else {}
        return self._attributes

    @property
    def built_attributes(self) -> dict[str, Any] | None:
        """``input.attributes`` if something already built them whole, else None (nothing is built here)."""
        return self._attributes

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


def build_input(facts: Facts, identity: Mapping[str, Any], signals: Mapping[str, Any],
                tree: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The OPA-Envoy v3 input document for ``facts``; raises ``RequestError`` where the
    OPA-Envoy plugin would answer 400 (bad escapes in path or query, unparsable body),
    whether or not the policy reads those parts. With ``tree`` (see ``policy.inputs``) the
    document holds only the parts the policy reads."""
    attributes_tree = tree.get("attributes") if tree is not None else None
    attributes = (facts.attributes(attributes_tree if isinstance(attributes_tree, Mapping) else None)
                  if tree is None or "attributes" in tree else {})
    document = _request_members(facts, attributes)
    document["identity"] = dict(identity)
    document["signals"] = dict(signals)
    if tree is None:
        return document
    # attributes came out projected already; the other members are small
    return {key: value if key == "attributes" or sub is True or not isinstance(value, dict) else project(value, sub)
            for key, sub in tree.items() if (value := document.get(key, _ABSENT)) is not _ABSENT}


_ABSENT = object()


def stable_input(facts: Facts) -> dict[str, Any] | None:
    """The input document's members that depend on ``facts.fingerprint`` alone (attributes
    without their volatile values, ``parsed_*``, ``truncated_body``, ``version``,
    ``source_principal``); the factory's ``volatile`` completes them. None when the facts'
    attributes factory cannot tell the two apart. Raises ``RequestError`` as ``build_input`` does."""
    factory = facts.attributes_factory
    volatile = getattr(factory, "volatile", None)
    if not isinstance(volatile, Volatile) or not facts.fingerprint:
        return None
    stable: StableAttributeSource = factory  # type: ignore[assignment]  # it has a Volatile: it is one
    return _request_members(facts, stable.stable_attributes())


def _request_members(facts: Facts, attributes: dict[str, Any]) -> dict[str, Any]:
    """Every member of the input document that comes from the request itself."""
    parsed_path, parsed_query = parse_path_and_query(facts.path)
    parsed_body, truncated = parse_body(facts.headers, facts.body, facts.raw_body)
    document: dict[str, Any] = {
        "attributes": attributes,
        "parsed_path": parsed_path,
        "parsed_query": parsed_query,
        "parsed_body": parsed_body,
        "truncated_body": truncated,
        "version": INPUT_VERSION,
    }
    if facts.source_principal:
        document["source_principal"] = facts.source_principal
    return document


# -- path and query, with Go's net/url semantics (what OPA-Envoy's policies were written against)

def parse_path_and_query(path: str) -> tuple[list[str], dict[str, list[str]]]:
    raw_path, _, raw_query = path.partition("?")
    decoded = _unescape(raw_path, plus_is_space=False, what="path")
    return decoded.lstrip("/").split("/"), parse_query(raw_query)


def parse_query(query: str) -> dict[str, list[str]]:
    """``url.ParseQuery``: ``&``-separated, ``+`` is a space, a ``;`` is an error (Go ≥ 1.17)."""
    result: dict[str, list[str]] = {}
    # Most queries hold no escape and no "+": then no part has one either, and unescaping
    # each name and value gives them back as they are (a third of the time of a query of
    # two parameters, on every uncached decision and every record of traffic that does not repeat).
    plain = "%" not in query and "+" not in query
    for part in query.split("&"):
        if ";" in part:
            raise RequestError("invalid semicolon separator in query", code="bad_query")
        if not part:
            continue
        key, _, value = part.partition("=")
        if not plain:
            key = _unescape(key, plus_is_space=True, what="query")
            value = _unescape(value, plus_is_space=True, what="query")
        result.setdefault(key, []).append(value)
    return result


def _unescape(text: str, *, plus_is_space: bool, what: str) -> str:
    if "%" not in text and not (plus_is_space and "+" in text):
        return text
    bad = _BAD_ESCAPE.search(text)
    if bad is not None:
        raise RequestError(f"invalid URL escape at offset {bad.start()} in {what}", code=f"bad_{what}")
    raw = text.encode("utf-8", "surrogateescape")
    if plus_is_space:
        raw = raw.replace(b"+", b" ")
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{what} is not UTF-8 after unescaping", code=f"bad_{what}") from None


# -- body, as OPA-Envoy's getParsedBody

def parse_body(headers: Mapping[str, str], body: str, raw_body: bytes) -> tuple[Any, bool]:
    """Returns ``(parsed_body, truncated_body)``."""
    if headers.get("x-envoy-auth-partial-body") == "true":
        return None, True
    if not body and not raw_body:  # what every content type below gives an empty payload (one header read less)
        return None, False
    content_type = headers.get("content-type")
    if content_type is None:
        return None, False
    if "application/json" in content_type:
        payload = _payload(body, raw_body)
        if payload is None:
            return None, False
        if _truncated(headers, payload):
            return None, True
        try:
            return json.loads(payload, parse_constant=_not_json), False
        except (ValueError, RecursionError):
            raise RequestError("request body is not valid JSON", code="bad_body") from None
    if "application/x-www-form-urlencoded" in content_type:
        payload = _payload(body, raw_body)
        if payload is None:
            return None, False
        if _truncated(headers, payload):
            return None, True
        return parse_query(payload.decode("utf-8", "surrogateescape")), False
    if "multipart/form-data" in content_type:
        payload = _payload(body, raw_body)
        if payload is None:
            return None, False
        if _truncated(headers, payload):
            return None, True
        return _parse_multipart(content_type, payload), False
    return None, False


def _payload(body: str, raw_body: bytes) -> bytes | None:
    # Bounded by the fronts (limits.max_body_bytes) before the request is read into facts.
    payload = body.encode("utf-8", "surrogateescape") if body else raw_body
    return payload or None


def _truncated(headers: Mapping[str, str], payload: bytes) -> bool:
    declared = headers.get("content-length")
    if declared is None:
        return False
    # Go's strconv.ParseInt(s, 10, 64): an optional sign and ASCII digits, nothing else
    # (Python's int() would also take spaces, "1_000" and non-ASCII digits).
    length = int(declared) if len(declared) <= 20 and _DECIMAL.match(declared) else None
    if length is None or not -(2**63) <= length < 2**63:
        raise RequestError("content-length is not a number", code="bad_request")
    return length != -1 and length > len(payload)


def _not_json(constant: str) -> Any:
    """``json.loads`` takes ``NaN`` and ``Infinity``; JSON (and OPA-Envoy) does not."""
    raise ValueError(f"{constant} is not JSON")


def _parse_multipart(content_type: str, payload: bytes) -> dict[str, list[Any]] | None:
    if "boundary=" not in content_type:
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"content-type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + payload
    )
    if not message.is_multipart():
        raise RequestError("multipart body does not match its boundary", code="bad_body")
    values: dict[str, list[Any]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        decoded = part.get_payload(decode=True)  # bytes for a leaf part, which every form field is
        data = decoded if isinstance(decoded, bytes) else b""
        if "application/json" in (part.get_content_type() or ""):
            try:
                value: Any = json.loads(data, parse_constant=_not_json)
            except (ValueError, RecursionError):
                raise RequestError("a multipart field is not valid JSON", code="bad_body") from None
        else:
            value = data.decode("utf-8", "replace")
        values.setdefault(str(name), []).append(value)
    return values
