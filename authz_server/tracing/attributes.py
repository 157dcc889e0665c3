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

from typing import Any, Iterable, Mapping

from ..audit.record import who

SPAN_NAME = "authz.decision"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# A decision that could not be made as designed (not a deny: a deny is an answer).
_FAILED_PHASES = frozenset({"internal", "unavailable"})
_FAILED_CODES = frozenset({"policy_timeout", "policy_eval_error", "policy_engine_panic", "policy_not_loaded",
                           "internal_error"})


def decision_attributes(decision: Any, facts: Any) -> dict[str, Any]:
    """The span attributes of ``decision`` (see the module docstring)."""
    attributes: dict[str, Any] = {
        "authz.decision_id": decision.decision_id,
        "authz.allowed": decision.allowed,
        "authz.code": decision.code,
        "authz.phase": decision.phase,
        "authz.cached": decision.cached,
        "authz.policy_version": decision.policy_version,
        "http.response.status_code": decision.http_status,
    }
    if decision.dry_run:
        attributes["authz.dry_run"] = True
        attributes["authz.would_allow"] = bool(decision.would_allow)
    document = decision.identity.document
    if document:
        subject, spiffe_id = who(document)
        attributes["authz.identity.method"] = str(document.get("method") or "none")
        if subject:
            attributes["authz.subject"] = subject
        if spiffe_id:
            attributes["authz.spiffe_id"] = spiffe_id
    if decision.signals:
        attributes["authz.signals"] = sorted(str(name) for name in decision.signals)
    explanation = getattr(decision, "explanation", None)
    if explanation:
        attributes["authz.explained"] = str(explanation.get("mode", ""))
    if facts is not None:
        attributes["authz.transport"] = facts.transport
        method = str(facts.method).upper()
        attributes["http.request.method"] = method if method in _METHODS else "_OTHER"
    return attributes


def failed(decision: Any) -> bool:
    """True when the decision is an error (the span's status), not an answer."""
    return decision.phase in _FAILED_PHASES or decision.code in _FAILED_CODES


def trace_carrier(facts: Any, fields: Iterable[str]) -> dict[str, str]:
    """The propagation headers (``fields``) the request carried."""
    if facts is None:
        return {}
    headers: Mapping[str, str] = facts.headers
    volatile = getattr(getattr(facts.attributes_factory, "volatile", None), "headers", None) or {}
    carrier = {}
    for name in fields:
        value = headers.get(name) or volatile.get(name)
        if value:
            carrier[name] = value
    return carrier
