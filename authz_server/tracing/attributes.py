"""What a decision's span may say, and where its parent comes from.

A span leaves this process for a collector that more people read than the audit log, so it
carries names, never content: the decision's id, outcome, stable code, phase and policy
version; the verified caller as the audit log's columns name it (subject, SPIFFE ID) and how
it was verified (``session``, ``jwt``, ``mtls``, ``none``); the names of the signals fed to
the policy; the request's method (one of the standard ones, else ``_OTHER``). No header value,
path, query, body, token, session id, cookie or free-text message: the request's URL is on
Envoy's own span, this span's parent. What the audit log would redact never gets here.

The parent is the trace context the request carried (W3C ``traceparent``/``tracestate``, or
whatever ``OTEL_PROPAGATORS`` names), read from the headers Envoy forwarded: the
``CheckRequest``'s in gRPC mode (where the volatile ones are kept apart, see ``facts.Volatile``),
the request's in HTTP mode.
"""

from __future__ import annotations

import binascii
import re
from typing import Any, Iterable, Mapping

from ..audit.record import who

SPAN_NAME = "authz.decision"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
STANDARD_METHODS = {method: method for method in METHODS}  # a standard method as sent: no upper() copy to find it
# A decision that could not be made as designed (not a deny: a deny is an answer).
FAILED_PHASES = frozenset({"internal", "unavailable"})
FAILED_CODES = frozenset({"policy_timeout", "policy_eval_error", "policy_engine_panic", "policy_not_loaded",
                          "internal_error"})
# The last digit of a ``traceparent``'s flags when the sampled bit is clear (W3C: lowercase hex).
UNSAMPLED_DIGITS = frozenset("02468ace")
# The W3C traceparent grammar, as the SDK's TraceContextTextMapPropagator reads it.
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$")
_TRACEPARENT_MAX = 512
_ZERO_TRACE, _ZERO_SPAN = bytes(16), bytes(8)
_unhexlify = binascii.unhexlify


def decision_attributes(decision: Any, facts: Any) -> dict[str, Any]:
    """The span attributes of ``decision`` (see the module docstring)."""
    return {"authz.decision_id": decision.decision_id, **shape_attributes(attribute_shape(decision, facts))}


def attribute_shape(decision: Any, facts: Any) -> tuple[Any, ...]:
    """Everything the attributes say but the decision's id, as a hashable tuple: decisions of one
    shape share every other attribute, so an encoder can make their bytes once (``otlp``)."""
    document = decision.identity.document
    if document:
        subject, spiffe_id = who(document)
        identity: tuple[str, str, str] | None = (str(document.get("method") or "none"), subject, spiffe_id)
    else:
        identity = None
    explanation = getattr(decision, "explanation", None)
    if facts is not None:
        method = STANDARD_METHODS.get(facts.method)
        if method is None:
            method = str(facts.method).upper()
            method = method if method in METHODS else "_OTHER"
        request: tuple[str, str] | None = (facts.transport, method)
    else:
        request = None
    return (decision.allowed, decision.code, decision.phase, decision.cached, decision.policy_version,
            decision.http_status, bool(decision.would_allow) if decision.dry_run else None, identity,
            tuple(sorted(str(name) for name in decision.signals)) if decision.signals else None,
            str(explanation.get("mode", "")) if explanation else None, request)


def shape_attributes(shape: tuple[Any, ...]) -> dict[str, Any]:
    """The attributes an ``attribute_shape`` stands for (all but ``authz.decision_id``), in order."""
    allowed, code, phase, cached, policy_version, http_status, would_allow, identity, signals, explained, \
        request = shape
    attributes: dict[str, Any] = {
        "authz.allowed": allowed,
        "authz.code": code,
        "authz.phase": phase,
        "authz.cached": cached,
        "authz.policy_version": policy_version,
        "http.response.status_code": http_status,
    }
    if would_allow is not None:
        attributes["authz.dry_run"] = True
        attributes["authz.would_allow"] = would_allow
    if identity is not None:
        method, subject, spiffe_id = identity
        attributes["authz.identity.method"] = method
        if subject:
            attributes["authz.subject"] = subject
        if spiffe_id:
            attributes["authz.spiffe_id"] = spiffe_id
    if signals is not None:
        attributes["authz.signals"] = list(signals)
    if explained is not None:
        attributes["authz.explained"] = explained
    if request is not None:
        attributes["authz.transport"], attributes["http.request.method"] = request
    return attributes


def failed(decision: Any) -> bool:
    """True when the decision is an error (the span's status), not an answer."""
    return decision.phase in FAILED_PHASES or decision.code in FAILED_CODES


def trace_carrier(facts: Any, fields: Iterable[str]) -> dict[str, str]:
    """The propagation headers (``fields``) the request carried."""
    if facts is None:
        return {}
    carrier = {}
    for name in fields:
        value = trace_header(facts, name)
        if value:
            carrier[name] = value
    return carrier


def trace_header(facts: Any, name: str) -> str | None:
    """One propagation header of the request (in gRPC mode maybe among the volatile ones)."""
    return trace_header_in(facts, name)[0]


def trace_header_in(facts: Any, name: str) -> tuple[str | None, Mapping[str, str]]:
    """``trace_header``, and the headers it was found in: the W3C ``tracestate`` is where its
    ``traceparent`` is, both volatile (``facts.VOLATILE_HEADERS``: kept apart together in gRPC mode)."""
    headers: Mapping[str, str] = facts.headers
    value = headers.get(name)
    if not value:
        volatile = getattr(facts.attributes_factory, "volatile", None)
        if volatile is not None:
            headers = volatile.headers
            value = headers.get(name)
    return value, headers


def parse_traceparent(value: str) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C ``traceparent``; None for any other value,
    which the SDK's propagator reads as no parent at all (whatever its flags say)."""
    if len(value) == 55 and value[2] == "-" and value[35] == "-" and value[52] == "-" and value[:2] == "00":
        # The usual form, decided here without the regular expression (which would match it at these positions
        # only): hex, where ``unhexlify`` also takes the capitals W3C refuses (``islower`` would say so without
        # a copy, but looks every character up in the Unicode tables: 0.25 µs, the copy 0.04).
        try:
            raw = _unhexlify(value.replace("-", ""))
        except ValueError:  # not hex, or a fourth "-" (an odd count of digits)
            return None
        if len(raw) != 26 or value.lower() != value:
            return None
        trace_id, span_id = raw[1:17], raw[17:25]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        return trace_id, span_id, raw[25] & 1 == 1
    if len(value) > _TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT.search(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if trace_hex == "0" * 32 or span_hex == "0" * 16 or version == "ff" or version == "00" and rest:
        return None
    return bytes.fromhex(trace_hex), bytes.fromhex(span_hex), int(flags_hex, 16) & 1 == 1
