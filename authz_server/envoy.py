"""Envoy's ext_authz v3 protobufs ↔ our plain values.

``facts_from_check_request`` reads a ``CheckRequest`` into ``Facts``; its ``attributes``
are produced lazily by ``protomap``, a port of OPA-Envoy's ``envoyauth/protomap.go``: only
populated fields, protobuf JSON (camelCase) names, ``Struct`` as a plain object, numbers
as numbers (int64 too), enums as their numbers, bytes as base64, ``Timestamp`` as
``{"seconds", "nanos"}`` — so policies written for OPA-Envoy read the same document.

``check_response`` renders a ``Decision``. Identity headers are set with overwrite
semantics, and identity headers we did not set are removed, so a client can never smuggle
its own ``x-authz-subject`` to the upstream (the rule: ``identity.verified.upstream_removals``).
"""

from __future__ import annotations

import base64
import math
from typing import Any, Callable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from .decision import DECISION_ID_HEADER, Decision
from .decisioncache import request_fingerprint
from .errors import RequestError
from .facts import VOLATILE_ATTRIBUTES, VOLATILE_HEADERS, Facts, Shape, Volatile, build_input, with_volatile
from .identity.verified import upstream_removals
from .limits import Limits
from .trees import overlaps, project

try:
    from . import _volatile_cut
except ImportError:  # built without a C compiler: the gRPC front then never replays repeats
    _volatile_cut = None  # type: ignore[assignment]

CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse

_AttributeContext = attribute_context_pb2.AttributeContext
_PRESENT = {(m, p, h): bytes((m, p, h)) for m in (False, True) for p in (False, True) for h in (False, True)}

OK, INVALID_ARGUMENT, PERMISSION_DENIED, UNAVAILABLE, UNAUTHENTICATED = 0, 3, 7, 14, 16
DEFAULT_LIMITS = Limits()


# -- protomap

_STRUCT = "google.protobuf.Struct"
_Converter = Callable[[Any], Any]


def protomap(message: Message, tree: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The OPA-Envoy form of ``message``; with ``tree`` (see ``trees``), only the
    parts it names (read by the tree's ``_Projection``, made once per tree)."""
    if tree is not None:
        return _projection(message.DESCRIPTOR, tree).project(message)
    if message.DESCRIPTOR.full_name == _STRUCT:
        return json_format.MessageToDict(message)
    return {field.json_name: _converter(field)(value) for field, value in message.ListFields()}


_Step = Callable[[Message, dict[str, Any]], None]


class _Projection:
    """What ``protomap(message, tree)`` reads, for one message type and one tree, decided once:
    the fields the tree names, in field-number order (``ListFields``' order, so the document
    and its encoding are the same as converting every field and keeping the named ones), each
    read directly. On every uncached decision: reading the three fields a policy names this way
    takes a few µs, where listing and walking every populated field took about 20."""

    __slots__ = ("steps", "struct", "volatile")

    def __init__(self, descriptor: Any, tree: Mapping[str, Any]) -> None:
        self.struct = descriptor.full_name == _STRUCT  # converted whole, whatever the tree names
        self.volatile = overlaps(tree, VOLATILE_ATTRIBUTES)  # (meaningful for AttributeContext trees)
        by_json = {field.json_name: field for field in descriptor.fields}
        named = sorted(((by_json[key], sub) for key, sub in tree.items() if key in by_json),
                       key=lambda pair: pair[0].number)
        self.steps: tuple[_Step, ...] = tuple(_step(field, sub) for field, sub in named)

    def project(self, message: Message) -> dict[str, Any]:
        if self.struct:
            return json_format.MessageToDict(message)
        out: dict[str, Any] = {}
        for step in self.steps:
            step(message, out)
        return out


def _step(field: FieldDescriptor, sub: Any) -> _Step:
    """How one named field is read into ``out``: present as ``ListFields`` has it (a message or
    a field with presence: set; a list or map: not empty; any other scalar: not its zero)."""
    attr, name, message_type = field.name, field.json_name, field.message_type
    convert = _converter(field)
    is_map = message_type is not None and message_type.GetOptions().map_entry
    if is_map and sub is not True:
        value_field = message_type.fields_by_name["value"]
        value_type = value_field.message_type
        one = _scalar(value_field) if value_type is None else None
        wanted = tuple(sub.items())

        def read_map(message: Message, out: dict[str, Any]) -> None:
            value = getattr(message, attr)
            if not value:
                return
            kept: dict[str, Any] = {}
            for key, below in wanted:
                if key in value:
                    item = value[key]
                    kept[key] = one(item) if one is not None else protomap(item, None if below is True else below)
            if kept:  # an empty remainder reads as undefined all the same, and keeps cache keys equal
                out[name] = kept
        return read_map
    if is_map or field.is_repeated:
        def read_many(message: Message, out: dict[str, Any]) -> None:
            value = getattr(message, attr)
            if value:
                out[name] = convert(value)
        return read_many
    if message_type is not None:
        inner = None if sub is True else _Projection(message_type, sub)

        def read_message(message: Message, out: dict[str, Any]) -> None:
            if message.HasField(attr):
                if inner is None:
                    out[name] = convert(getattr(message, attr))
                elif kept := inner.project(getattr(message, attr)):
                    out[name] = kept
        return read_message
    if field.has_presence:
        def read_set(message: Message, out: dict[str, Any]) -> None:
            if message.HasField(attr):
                out[name] = convert(getattr(message, attr))
        return read_set
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        def read_float(message: Message, out: dict[str, Any]) -> None:
            value = getattr(message, attr)
            if value or math.copysign(1.0, value) < 0:  # -0.0 is not the zero ListFields leaves out
                out[name] = convert(value)
        return read_float

    def read_scalar(message: Message, out: dict[str, Any]) -> None:
        value = getattr(message, attr)
        if value:
            out[name] = convert(value)
    return read_scalar


_projections: dict[tuple[str, int], tuple[Mapping[str, Any], _Projection]] = {}


def _projection(descriptor: Any, tree: Mapping[str, Any]) -> _Projection:
    """The projection of ``tree`` (a policy's, made once per policy version and never changed)
    over ``descriptor``'s messages, made on first use; keyed on the tree object itself."""
    key = (descriptor.full_name, id(tree))
    known = _projections.get(key)
    if known is not None and known[0] is tree:
        return known[1]
    if len(_projections) >= 256:  # trees of policy versions long gone
        _projections.clear()
    projection = _Projection(descriptor, tree)
    _projections[key] = (tree, projection)
    return projection


def _scalar(field: FieldDescriptor) -> _Converter:
    if field.type == FieldDescriptor.TYPE_BYTES:
        return lambda v: base64.b64encode(v).decode("ascii")
    return lambda v: v


_converters: dict[str, _Converter] = {}


def _converter(field: FieldDescriptor) -> _Converter:
    cached = _converters.get(field.full_name)
    if cached is not None:
        return cached
    message_type = field.message_type
    converter: _Converter
    if message_type is not None and message_type.GetOptions().map_entry:
        value_field = message_type.fields_by_name["value"]
        one = protomap if value_field.message_type is not None else _scalar(value_field)
        converter = lambda m, one=one: {str(k): one(v) for k, v in m.items()}  # noqa: E731
    elif field.is_repeated:
        one = protomap if message_type is not None else _scalar(field)
        converter = lambda items, one=one: [one(v) for v in items]  # noqa: E731
    elif message_type is not None:
        converter = protomap
    else:
        converter = _scalar(field)
    _converters[field.full_name] = converter
    return converter


# -- CheckRequest → Facts

def parse_check_request(data: bytes, limits: Limits = DEFAULT_LIMITS) -> CheckRequest:
    """``data`` as a CheckRequest within ``limits``: a request too large as a whole is not
    even parsed; then its body, header count and header bytes (the path included) are held
    to the limits, which bound what reading it into facts and an input document costs."""
    if len(data) > limits.max_request_bytes:
        raise RequestError(f"CheckRequest of {len(data)} bytes is over the limit", code="request_too_large")
    request = CheckRequest()
    try:
        request.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise RequestError(f"malformed CheckRequest: {exc}", code="malformed_request") from None
    http = request.attributes.request.http
    body = len(http.body) + len(http.raw_body)
    if body > limits.max_body_bytes:
        raise RequestError(f"request body of {body} bytes is over the limit of {limits.max_body_bytes}",
                           code="body_too_large")
    if len(http.headers) + len(http.header_map.headers) > limits.max_headers:
        raise RequestError(f"more than {limits.max_headers} headers", code="request_too_large")
    if len(data) - body > limits.max_header_bytes:  # else the headers and path cannot be over it
        head = len(http.path) + sum(len(k) + len(v) for k, v in http.headers.items()) + sum(
            len(h.key) + len(h.value) + len(h.raw_value) for h in http.header_map.headers)
        if head > limits.max_header_bytes:
            raise RequestError(f"path and headers of {head} bytes are over the limit of {limits.max_header_bytes}",
                               code="request_too_large")
    return request


def check_request_from_json(document: Mapping[str, Any]) -> CheckRequest:
    """A CheckRequest from its protobuf JSON form (test fixtures, policy test cases)."""
    try:
        return json_format.ParseDict(dict(document), CheckRequest(), ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise RequestError(f"malformed CheckRequest JSON: {exc}", code="malformed_request") from None


def input_from_request_json(request: Mapping[str, Any], identity: Mapping[str, Any],
                            signals: Mapping[str, Any]) -> dict[str, Any]:
    """The input document of a CheckRequest in protobuf JSON: how a policy test case given as
    a ``request`` is read (``policy.testing.RequestReader``)."""
    return build_input(facts_from_check_request(check_request_from_json(request)), identity, signals)


def _joined_raw_headers(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    headers: dict[str, str] = {}
    for entry in http.header_map.headers:  # Envoy's encode_raw_headers form
        value = entry.value or entry.raw_value.decode("utf-8", "replace")
        key = entry.key.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def facts_from_check_request(request: CheckRequest, repeat_key: bytes | None = None) -> Facts:
    """Read a parsed request into ``Facts`` (the request is consumed: its volatile fields
    are moved into the facts so the rest can be digested as the cache fingerprint).
    ``repeat_key``: its key from ``cut_volatile``, when the front made one (the audit log
    reads the request's shape from it, see ``_AttributesAsSent.shape``).

    On the hot path of every check: field reads are kept to what the facts hold."""
    attributes = request.attributes
    req = attributes.request
    http = req.http
    source = attributes.source
    socket = source.address.socket_address
    request_id = http.id
    port = socket.port_value
    time_value = (req.time.seconds, req.time.nanos) if req.HasField("time") else None
    volatile: dict[str, str]
    if http.HasField("header_map"):
        headers: Mapping[str, str] = _joined_raw_headers(http)
        # Nothing is removed from the request, so nothing is put back into the attributes
        # (the facts still carry the request id and port, for the audit record).
        attributes_factory = _AttributesAsSent(attributes, None, None)
        fingerprint = request_fingerprint(_without_volatile(request))
    else:
        headers = http.headers
        volatile = {}
        for name in headers:
            if name in VOLATILE_HEADERS:
                volatile[name] = headers[name]
        for name in volatile:
            del headers[name]
        if request_id:
            http.id = ""
        if time_value is not None:
            req.ClearField("time")
        if port:
            socket.port_value = 0
        # Sorted map keys: the headers map's iteration order depends on its insertion and
        # deletion history (which volatile headers came and went), and an unsorted digest
        # then misses the cache for requests that differ only in those (~0.4 µs).
        fingerprint = request_fingerprint(request.SerializeToString(deterministic=True))
        attributes_factory = _AttributesAsSent(attributes, Volatile(request_id, time_value, port, volatile),
                                               repeat_key)
    return Facts(
        method=http.method, path=http.path, headers=headers, body=http.body, raw_body=http.raw_body, host=http.host,
        source_address=socket.address, source_port=port, source_principal=source.principal,
        source_certificate=source.certificate, context_extensions=attributes.context_extensions,
        request_id=request_id, fingerprint=fingerprint, transport="grpc", attributes_factory=attributes_factory,
    )


def _no_cut(raw: bytes) -> tuple[bytes, Volatile] | None:
    return None


# cut_volatile(raw): a serialized request's exact repeat key and its volatile values, read from
# the bytes without parsing them (C, ``_volatile_cut.c``): the key is the request minus its
# volatile fields. Two requests with the same key parse to the same request but for their
# volatile values. None when the bytes are not in the form Envoy writes (the raw-headers form
# included), or when the extension was not built: such a request is read with
# ``parse_check_request`` and never replayed. The C function itself, no Python wrapper: this
# runs on every check.
cut_volatile: Callable[[bytes], tuple[bytes, Volatile] | None] = _no_cut
if _volatile_cut is not None:
    _volatile_cut.configure(sorted(name.encode() for name in VOLATILE_HEADERS), Volatile)
    cut_volatile = _volatile_cut.cut


def repeat_facts(first: Facts, volatile: Volatile) -> Facts:
    """The facts of a request with the same repeat key as ``first`` (see ``cut_volatile``):
    ``first``'s, with ``volatile``'s values, and without reading the request at all."""
    factory = first.attributes_factory
    if not isinstance(factory, _AttributesAsSent) or factory.volatile is None:
        raise ValueError("only a gRPC request read without its volatile values can be repeated")
    return Facts(
        method=first.method, path=first.path, headers=first.headers, body=first.body, raw_body=first.raw_body,
        host=first.host, source_address=first.source_address, source_port=volatile.port,
        source_principal=first.source_principal, source_certificate=first.source_certificate,
        context_extensions=first.context_extensions, request_id=volatile.request_id, fingerprint=first.fingerprint,
        transport="grpc", attributes_factory=_AttributesAsSent(factory.attributes, volatile, factory.repeat_key),
    )


class _AttributesAsSent:
    """``Facts.attributes_factory`` for gRPC: cheaper to build per request than a closure.
    ``volatile`` is None in the raw-headers form, where the request keeps its volatile
    values (so the attributes are not a function of the fingerprint alone); ``repeat_key``
    the request's ``cut_volatile`` key, when the front made one (the bytes the repeat cache
    keys it by: kept here, they cost no memory of their own)."""

    __slots__ = ("attributes", "volatile", "repeat_key")

    def __init__(self, attributes: Any, volatile: Volatile | None, repeat_key: bytes | None) -> None:
        self.attributes, self.volatile, self.repeat_key = attributes, volatile, repeat_key

    def __call__(self, tree: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``input.attributes`` exactly as OPA-Envoy builds it, volatile values put back
        (only the parts ``tree`` names, when given)."""
        if tree is None:
            document = protomap(self.attributes)
        else:
            projection = _projection(self.attributes.DESCRIPTOR, tree)
            document = projection.project(self.attributes)
            if not projection.volatile:
                return document  # nothing to put back that the tree keeps
        if self.volatile is None:
            return document
        document = with_volatile(document, self.volatile)
        return document if tree is None else project(document, dict(tree))

    def stable_attributes(self) -> dict[str, Any]:
        return protomap(self.attributes)

    def shape(self, facts: Facts | None = None) -> Shape | None:
        """``facts.ShapedAttributeSource.shape``: the key is which of the method, path and
        headers are there (protomap leaves out what is not), and the rest of the request.
        ``facts``: the facts read from this request, whose method, path and headers are the
        message's own (``facts_from_check_request``, ``repeat_facts``): taken from there rather
        than read from the message again (the chain of upb reads was half of this call, 1.1 µs,
        more with the message cold in a busy server).

        The rest is read in C from the repeat key when there is one (``_volatile_cut.shape``:
        the request's bytes as Envoy sent them, without the volatile values, the method, path
        and headers; about 0.2 µs), else it is the attributes' deterministic bytes without
        those three (a copy is cut: the message may be shared with repeats of the request, read
        by other threads; 5-8 µs, more with the message's memory gone cold in a busy server).
        Either determines everything ``stable_attributes`` holds but those three. The two kinds
        are never equal (a tuple, bytes), so one process may hold both, even for requests of one
        route (one with a repeat key, one too large to be given one): such requests then take
        a template each, each exact."""
        if self.volatile is None:
            return None
        attributes = self.attributes
        if facts is not None:
            method, path, headers = facts.method, facts.path, facts.headers
        else:
            http = attributes.request.http
            method, path, headers = http.method, http.path, http.headers
        present = _PRESENT[bool(method), bool(path), bool(headers)]
        if self.repeat_key is not None:  # (there is none without the extension: see cut_volatile)
            rest = _volatile_cut.shape(self.repeat_key)
            if rest is not None:
                return (present, rest), method, path, headers
        copy = _AttributeContext()
        copy.CopyFrom(attributes)
        rest = copy.request.http
        rest.ClearField("method")
        rest.ClearField("path")
        rest.ClearField("headers")
        return present + copy.SerializeToString(deterministic=True), method, path, headers


def _without_volatile(request: CheckRequest) -> bytes:
    """Deterministic bytes of a copy of ``request`` minus its volatile fields (raw-headers form)."""
    copy = CheckRequest()
    copy.CopyFrom(request)
    http = copy.attributes.request.http
    http.id = ""
    copy.attributes.request.ClearField("time")
    copy.attributes.source.address.socket_address.port_value = 0
    kept = [h for h in http.header_map.headers if h.key.lower() not in VOLATILE_HEADERS]
    del http.header_map.headers[:]
    http.header_map.headers.extend(kept)
    return copy.SerializeToString(deterministic=True)


# -- Decision → CheckResponse

def _header_options(headers: tuple[tuple[str, str], ...], *, overwrite: bool) -> list[base_pb2.HeaderValueOption]:
    action = (base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD if overwrite
              else base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=action)
            for k, v in headers]


_GRPC_CODE_BY_PHASE = {"request": INVALID_ARGUMENT, "identity": UNAUTHENTICATED, "unavailable": UNAVAILABLE}


def check_response(decision: Decision) -> CheckResponse:
    response = CheckResponse()
    _fill(response, decision)
    _add_decision_id(response, decision.decision_id, decision.allowed)
    return response


def _fill(response: CheckResponse, decision: Decision) -> None:
    """Everything but the decision id."""
    metadata = decision.dynamic_metadata
    if metadata:
        response.dynamic_metadata.update(dict(metadata))
    if decision.allowed:
        response.status.code = OK
        ok = response.ok_response
        upstream = decision.upstream_headers
        ok.headers.extend(_header_options(upstream, overwrite=True))
        ok.headers_to_remove.extend(upstream_removals(upstream, decision.headers_to_remove))
        ok.response_headers_to_add.extend(_header_options(decision.response_headers, overwrite=False))
        for key, value in decision.query_parameters_to_set:
            ok.query_parameters_to_set.add(key=key, value=value)
        ok.query_parameters_to_remove.extend(decision.query_parameters_to_remove)
        return
    response.status.code = _GRPC_CODE_BY_PHASE.get(decision.phase, PERMISSION_DENIED)
    response.status.message = decision.code
    denied = response.denied_response
    denied.status.code = decision.http_status  # type: ignore[assignment]
    seen: set[str] = set()
    for name, value in decision.response_headers:
        # A name set twice (two Set-Cookie lines of a sign-in redirect) is appended the second time.
        denied.headers.extend(_header_options(((name, value),), overwrite=name.lower() not in seen))
        seen.add(name.lower())
    denied.body = decision.body


def _add_decision_id(response: CheckResponse, decision_id: str, allowed: bool) -> None:
    header = _header_options(((DECISION_ID_HEADER, decision_id),), overwrite=True)
    (response.ok_response if allowed else response.denied_response).headers.extend(header)
    response.dynamic_metadata["decision_id"] = decision_id


# A serialized CheckResponse that only carries a decision id. Protobuf merges concatenated
# messages (repeated fields append, maps merge), so an answer rendered without its decision id
# plus this fragment is the full answer: one bytes concatenation per answer rendered before.
_ID_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"  # a decision id's shape
_ID_PLACEHOLDER_BYTES = _ID_PLACEHOLDER.encode()


def _id_fragment(allowed: bool) -> bytes:
    fragment = CheckResponse()
    _add_decision_id(fragment, _ID_PLACEHOLDER, allowed)
    return fragment.SerializeToString()


_ID_FRAGMENTS = {allowed: _id_fragment(allowed) for allowed in (True, False)}


def check_response_bytes(decision: Decision) -> bytes:
    """The serialized answer; a cached allow reuses its rendering (see ``Decision.memo``), and
    allows and policy denies share theirs with the answers made of the same parts (see
    ``_renderings``)."""
    if len(decision.decision_id) != len(_ID_PLACEHOLDER):
        return check_response(decision).SerializeToString()
    memo = decision.memo
    if decision.allowed and memo is not None:
        template = memo.get("grpc")
        if template is None:
            template = memo["grpc"] = _allow_template(decision)
    else:
        key = _deny_key(decision)
        if key is None:
            return check_response(decision).SerializeToString()
        template = _shared_rendering(key, decision)
    return template + _ID_FRAGMENTS[decision.allowed].replace(_ID_PLACEHOLDER_BYTES, decision.decision_id.encode())


# Renderings by what they are made of. On traffic that does not repeat every decision is a new
# cache entry with a new memo, but its answer is one of few (a bare `true` or `false`, an allow
# per identity's headers), so it was mostly rendered before: a dict lookup, where building and
# serializing the CheckResponse took 15-20 µs an uncached decision.
_renderings: dict[tuple[Any, ...], bytes] = {}


def _allow_template(decision: Decision) -> bytes:
    """An allow's serialized answer but for its decision id."""
    verdict, identity = decision.verdict, decision.identity
    # What _fill reads of an allow: the verdict (hashable unless it carries dynamic metadata)
    # and the identity's headers.
    if verdict is None or verdict.dynamic_metadata is not None:
        return _rendering(decision)
    return _shared_rendering(
        (True, verdict, identity.upstream_headers, identity.headers_to_remove, identity.response_headers), decision)


def _deny_key(decision: Decision) -> tuple[Any, ...] | None:
    """What a deny's answer is made of, when the policy made it and it carries only what the
    policy gave (no explanation, whose body names the decision id): the verdict, and the code
    and status read from it. None for any other deny."""
    verdict = decision.verdict
    if (verdict is None or verdict.allowed or decision.allowed or decision.explain_denial
            or verdict.dynamic_metadata is not None or decision.phase != "policy"):
        return None
    return False, verdict, decision.code, decision.http_status


def _shared_rendering(key: tuple[Any, ...], decision: Decision) -> bytes:
    """The rendering of the answers made of ``key``'s parts, ``decision``'s the first time."""
    template = _renderings.get(key)
    if template is None:
        if len(_renderings) >= 4096:
            _renderings.clear()
        template = _renderings[key] = _rendering(decision)
    return template


def _rendering(decision: Decision) -> bytes:
    """``decision``'s serialized answer but for its decision id."""
    response = CheckResponse()
    _fill(response, decision)
    return response.SerializeToString()


__all__ = [
    "CheckRequest", "CheckResponse", "check_request_from_json", "check_response", "check_response_bytes",
    "cut_volatile", "facts_from_check_request", "input_from_request_json", "parse_check_request", "protomap",
    "repeat_facts",
]
