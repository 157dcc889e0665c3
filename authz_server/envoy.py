"""Envoy's ext_authz v3 protobufs ↔ our plain values.

``facts_from_check_request`` reads a ``CheckRequest`` into ``Facts``; its ``attributes``
are produced lazily by ``protomap``, a port of OPA-Envoy's ``envoyauth/protomap.go``: only
populated fields, protobuf JSON (camelCase) names, ``Struct`` as a plain object, numbers
as numbers (int64 too), enums as their numbers, bytes as base64, ``Timestamp`` as
``{"seconds", "nanos"}`` — so policies written for OPA-Envoy read the same document.

``check_response`` renders a ``Decision``. Identity headers are set with overwrite
semantics, and identity headers we did not set are removed, so a client can never smuggle
its own ``x-authz-subject`` to the upstream.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Callable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from .decision import Decision
from .errors import RequestError
from .facts import Facts

CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse

OK, INVALID_ARGUMENT, PERMISSION_DENIED, UNAVAILABLE, UNAUTHENTICATED = 0, 3, 7, 14, 16

# Headers whose value differs on every request (ids, tracing) and that no sane policy
# decides on: left out of the decision-cache key, or the cache would never hit. A policy
# that does read them can turn the cache off in its .manifest.
VOLATILE_HEADERS = frozenset({
    "x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
    "x-b3-sampled", "x-b3-flags", "x-ot-span-context", "uber-trace-id", "x-amzn-trace-id",
    "x-cloud-trace-context", "x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-sampling-priority",
    "grpc-trace-bin", "x-envoy-expected-rq-timeout-ms", "x-envoy-attempt-count",
})
# Identity headers we own upstream: always set by us or removed.
IDENTITY_HEADERS = ("x-authz-subject", "x-authz-spiffe-id")

MAX_CHECK_REQUEST_BYTES = 4 * 1024 * 1024


# -- protomap

_STRUCT = "google.protobuf.Struct"
_Converter = Callable[[Any], Any]


def protomap(message: Message) -> dict[str, Any]:
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == _STRUCT:
        return json_format.MessageToDict(message)
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        out[field.json_name] = _converter(field)(value)
    return out


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

def parse_check_request(data: bytes) -> CheckRequest:
    if len(data) > MAX_CHECK_REQUEST_BYTES:
        raise RequestError(f"CheckRequest of {len(data)} bytes is over the limit", code="request_too_large")
    request = CheckRequest()
    try:
        request.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise RequestError(f"malformed CheckRequest: {exc}", code="malformed_request") from None
    return request


def check_request_from_json(document: Mapping[str, Any]) -> CheckRequest:
    """A CheckRequest from its protobuf JSON form (test fixtures, policy test cases)."""
    try:
        return json_format.ParseDict(dict(document), CheckRequest(), ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise RequestError(f"malformed CheckRequest JSON: {exc}", code="malformed_request") from None


def _headers(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    if http.headers:
        return dict(http.headers)
    headers: dict[str, str] = {}
    for entry in http.header_map.headers:  # Envoy's encode_raw_headers form
        value = entry.value or entry.raw_value.decode("utf-8", "replace")
        key = entry.key.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _fingerprint(request: CheckRequest) -> bytes:
    """Digest of the request minus its volatile fields (ids, time, source port, tracing)."""
    attributes = request.attributes
    http = attributes.request.http
    saved_id = http.id
    saved_time = attributes.request.time.SerializeToString() if attributes.request.HasField("time") else None
    socket = attributes.source.address.socket_address
    saved_port = socket.port_value
    saved_headers = {k: http.headers[k] for k in VOLATILE_HEADERS if k in http.headers}
    http.id = ""
    attributes.request.ClearField("time")
    socket.port_value = 0
    for key in saved_headers:
        del http.headers[key]
    try:
        blob = request.SerializeToString(deterministic=True)
    finally:
        http.id = saved_id
        if saved_time is not None:
            attributes.request.time.ParseFromString(saved_time)
        socket.port_value = saved_port
        for key, value in saved_headers.items():
            http.headers[key] = value
    return hashlib.blake2b(blob, digest_size=20).digest()


def facts_from_check_request(request: CheckRequest) -> Facts:
    attributes = request.attributes
    http = attributes.request.http
    source = attributes.source
    return Facts(
        method=http.method,
        path=http.path,
        headers=_headers(http),
        body=http.body,
        raw_body=http.raw_body,
        host=http.host,
        source_address=source.address.socket_address.address,
        source_port=source.address.socket_address.port_value,
        source_principal=source.principal,
        source_certificate=source.certificate,
        context_extensions=dict(attributes.context_extensions),
        request_id=http.id,
        fingerprint=_fingerprint(request),
        transport="grpc",
        attributes_factory=lambda: protomap(attributes),
    )


# -- Decision → CheckResponse

def _header_options(headers: tuple[tuple[str, str], ...], *, overwrite: bool) -> list[base_pb2.HeaderValueOption]:
    action = (base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD if overwrite
              else base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=action)
            for k, v in headers]


def _struct(values: Mapping[str, Any] | None, decision_id: str) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    if values:
        metadata.update(dict(values))
    metadata["decision_id"] = decision_id
    return metadata


_GRPC_CODE_BY_PHASE = {"request": INVALID_ARGUMENT, "identity": UNAUTHENTICATED, "unavailable": UNAVAILABLE}


def check_response(decision: Decision) -> CheckResponse:
    response = CheckResponse()
    response.dynamic_metadata.CopyFrom(_struct(decision.dynamic_metadata, decision.decision_id))
    if decision.allowed:
        response.status.code = OK
        ok = response.ok_response
        ok.headers.extend(_header_options(decision.upstream_headers, overwrite=True))
        ours = {name for name, _ in decision.upstream_headers}
        ok.headers_to_remove.extend(
            list(dict.fromkeys([*decision.headers_to_remove, *(h for h in IDENTITY_HEADERS if h not in ours)])))
        ok.response_headers_to_add.extend(_header_options(decision.response_headers, overwrite=False))
        for key, value in decision.query_parameters_to_set:
            ok.query_parameters_to_set.add(key=key, value=value)
        ok.query_parameters_to_remove.extend(decision.query_parameters_to_remove)
        return response
    response.status.code = _GRPC_CODE_BY_PHASE.get(decision.phase, PERMISSION_DENIED)
    response.status.message = decision.code
    denied = response.denied_response
    denied.status.code = decision.http_status  # type: ignore[assignment]
    denied.headers.extend(_header_options(decision.response_headers, overwrite=True))
    denied.body = decision.body
    return response


__all__ = [
    "CheckRequest", "CheckResponse", "check_request_from_json", "check_response",
    "facts_from_check_request", "parse_check_request", "protomap",
]
