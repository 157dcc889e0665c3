"""The audit log's fast path writes what the straightforward path writes.

The reference is the record as it was made before issue 28, kept here on purpose: build the
whole document (``build_document``), redact it as one tree (``Redactor.redact``), render it
with the standard library (``reference_line``). The fast path (``RecordBuilder.build``: parts
kept per request fingerprint and per identity, strings and results redacted once per value,
orjson) must give the same record in meaning (the same members and values; ``masked`` and
``erased`` the same pointers) for generated requests, through both fronts, with and without
the input the policy saw, with secrets in the places a request can hold them, and with one
builder across examples so that what it keeps is reused and evicted as in a server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server.audit.builder import RecordBuilder
from authz_server.audit.record import build_document
from authz_server.audit.redact import Redactor
from authz_server.audit.render import reference_line, render_line
from authz_server.decision import Decision, Identity
from authz_server.envoy import check_request_from_json, cut_volatile, facts_from_check_request, parse_check_request
from authz_server.facts import Facts, build_input
from authz_server.http import HttpRequest
from authz_server.httpfront import facts_from_http
from tests.support.audit import a_jwt, check_request_json, workload

NOW = 1_790_000_000.0
LABELS = {"app": "authz-server", "id": "test", "version": "0"}
PATH = "envoy/authz/allow"
JWT = a_jwt("mallory", scope="admin")
BUILDER = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor(), memo_size=16)  # small: evictions happen

# "token=...": a path segment that reads as a token parameter once parsed, not in the path itself
segments = st.sampled_from(["orders", "users", "public", "v1", "items", "a%2Fb", "é", "x y", "token=abcdefgh1",
                            "file.json", "a~b_c-d"])
ids = st.one_of(st.integers(0, 5).map(str), st.uuids().map(str))
# plain parameters take plain values; token parameters (TOKEN_PARAMETERS) take secrets
query_pairs = st.one_of(
    st.tuples(st.sampled_from(["page", "q", "state"]), st.sampled_from(["1", "abc", "", "a%20b", "token=abcdefgh1",
                                                                  "long-plain-value_1234"])),
    st.tuples(st.sampled_from(["access_token", "code", "token", "id_token", "Access_Token"]),
              st.sampled_from([JWT, "opaque-secret-1234", "authz-code-1234"])))
paths = st.builds(lambda parts, query: "/" + "/".join(parts) + ("?" + "&".join(f"{k}={v}" for k, v in query)
                                                                 if query else ""),
                  st.lists(st.one_of(segments, ids), min_size=1, max_size=4), st.lists(query_pairs, max_size=3))
header_values = {
    "authorization": st.sampled_from([f"Bearer {JWT}", "Basic dXNlcjpwYXNzd29yZA==", "opaque-no-scheme-123"]),
    "cookie": st.sampled_from(["theme=dark; __Host-authz-session=s3cr3t-s3ss10n", "sid=abc123456789"]),
    "x-session-id": st.sampled_from(["session-aaaaaaaaaaaaaaaa", "session-bbbbbbbbbbbbbbbb"]),
    "user-agent": st.sampled_from(["curl/8.5.0", "Mozilla/5.0 (X11; Linux x86_64)"]),
    "accept": st.just("application/json"),
    "x-forwarded-jwt": st.just(JWT),
    "referer": st.sampled_from(["https://app.test/cb?state=1&code=authz-code-1234", "https://app.test/home"]),
    "x-request-id": ids,  # volatile: differs per request
    "traceparent": st.integers(1, 10**6).map(lambda n: f"00-{n:032x}-{n:016x}-01"),  # volatile
    "x-note": st.sampled_from(["plain words", '{"refresh_token": "rt-123456789"}', "Bearer in text 12345678"]),
    "x-envoy-auth-partial-body": st.sampled_from(["true", "false"]),  # truncated_body, without a body
}
headers = st.fixed_dictionaries({}, optional=header_values)
users = st.sampled_from([None, "alice", "bob", JWT])
signals = st.fixed_dictionaries({"rate": st.fixed_dictionaries({"remaining": st.integers(0, 100)})},
                                optional={"anomaly": st.fixed_dictionaries({"score": st.floats(0, 1)}),
                                          "note": st.sampled_from(["ok", f"token={JWT}"])})
results = st.one_of(st.booleans(), st.fixed_dictionaries(
    {"allowed": st.booleans()},
    optional={"headers": st.fixed_dictionaries({}, optional={"x-session-id": st.just("new-session-123456"),
                                                             "x-user": st.just("alice")}),
              "http_status": st.sampled_from([200, 403, 429]), "body": st.sampled_from(["", "slow down"])}))
messages = st.sampled_from(["allowed by policy", "denied by policy", f"token {JWT} expired",
                            "bad cookie sid=abcdefgh12345"])


def identity_for(user: str | None, principal: str) -> Identity:
    document: dict[str, Any] = {"method": "session" if user else "mtls",
                                "workload": {"spiffe_id": principal, "trust_domain": "example.org"},
                                "user": None, "session": None, "delegation": []}
    if user:
        document["user"] = {"sub": user, "iss": "https://idp.test", "claims": {"sub": user, "note": "hi there"}}
        document["session"] = {"id_sha256": "ab" * 32, "created": NOW, "expires": NOW + 60, "bound_to": {},
                               "raw": "s3ss10n-secret-value"}
    return Identity(document, fingerprint=f"{user}|{principal}".encode())


def grpc_facts(path: str, request_headers: dict[str, str], principal: str, request_id: str, port: int) -> Facts:
    """As the gRPC front reads a request: from its bytes, with its repeat key (the audit log
    reads the request's shape from that key, in C)."""
    document = check_request_json(path, principal=principal, headers=request_headers, request_id=request_id)
    document["attributes"]["source"]["address"]["socketAddress"]["portValue"] = port
    raw = check_request_from_json(document).SerializeToString()
    cut = cut_volatile(raw)
    return facts_from_check_request(parse_check_request(raw), None if cut is None else cut[0])


def grpc_facts_without_key(path: str, request_headers: dict[str, str], principal: str, request_id: str,
                           port: int) -> Facts:
    """As it reads one it made no repeat key for (a large one): the shape read from the message.
    Both kinds go through the same builders, as in a server."""
    document = check_request_json(path, principal=principal, headers=request_headers, request_id=request_id)
    document["attributes"]["source"]["address"]["socketAddress"]["portValue"] = port
    return facts_from_check_request(check_request_from_json(document))


def http_facts(path: str, request_headers: dict[str, str], principal: str, request_id: str, port: int) -> Facts:
    return facts_from_http(HttpRequest("GET", path, {**request_headers, "host": "orders",
                                                     "x-request-id": request_id or "none",
                                                     "x-forwarded-for": "10.0.0.7",
                                                     "x-authz-ctx-service": "orders"}), "")


FRONTS = [grpc_facts, grpc_facts_without_key, http_facts]


def meaning(line: str) -> dict[str, Any]:
    document = json.loads(line)
    return {**document, "masked": sorted(document.get("masked", [])), "erased": sorted(document.get("erased", []))}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(front=st.sampled_from(FRONTS), path=paths, request_headers=headers, user=users,
       principal=st.sampled_from([workload("web"), workload("batch")]), request_id=st.one_of(ids, st.just(JWT)),
       port=st.integers(1024, 65535), signals_value=signals, result=results, message=messages,
       policy_saw_input=st.booleans(), cached=st.booleans(), dry_run=st.booleans(), n=st.integers(0, 2**64))
def test_fast_path_records_mean_what_the_whole_path_records(
        front: Any, path: str, request_headers: dict[str, str], user: str | None, principal: str, request_id: str,
        port: int, signals_value: dict[str, Any], result: Any, message: str, policy_saw_input: bool, cached: bool,
        dry_run: bool, n: int) -> None:
    identity = identity_for(user, principal)
    facts = front(path, request_headers, principal, request_id, port)
    reference_facts = front(path, request_headers, principal, request_id, port)
    policy_input = None
    if policy_saw_input and not cached:
        try:
            policy_input = build_input(facts, identity.document, signals_value)
        except Exception:  # a request OPA-Envoy would answer 400: no input document
            policy_input = None
    reference_input = build_input(reference_facts, identity.document, signals_value) if policy_input else None

    def decision(input_document: Any) -> Decision:
        return Decision(allowed=bool(result), code="allowed" if result else "policy_denied", reason=message,
                        http_status=200 if result else 403, decision_id=f"{n:032x}", cached=cached, identity=identity, signals=signals_value, result=result,
                        policy_version="v1", input=input_document, dry_run=dry_run, would_allow=bool(result))

    fast = BUILDER.build(decision(policy_input), facts, NOW + n % 1000 / 7, handler_ns=5)
    expected = Redactor().redact(build_document(decision(reference_input), reference_facts, NOW + n % 1000 / 7,
                                                handler_ns=5, path=PATH, labels=LABELS))
    assert meaning(fast.line) == meaning(reference_line(expected))
    assert fast.document == json.loads(fast.line)  # the document the sinks index is the line they write
    assert (fast.subject, fast.spiffe_id) == (expected["subject"], expected["spiffe_id"])
    for secret in (JWT, "s3cr3t-s3ss10n", "opaque-secret-1234", "authz-code-1234", "rt-123456789",
                   "session-aaaaaaaaaaaaaaaa", "s3ss10n-secret-value", "dXNlcjpwYXNzd29yZA=="):
        assert secret not in fast.line


@given(value=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                                    st.text()),
                          lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=20))
@settings(max_examples=300, deadline=None)
def test_orjson_lines_mean_what_the_standard_library_wrote(value: Any) -> None:
    """Surrogates, integers beyond 64 bits and the rest: the same JSON value either way."""
    assert json.loads(render_line(value)) == json.loads(reference_line(value))


def test_what_orjson_spells_differently_on_purpose() -> None:
    assert render_line({"a": float("inf"), "b": float("nan")}) == '{"a":null,"b":null}'  # was Infinity/NaN: not JSON
    assert render_line({"é": "\u2028"}) == '{"é":"\u2028"}'  # UTF-8, not \\u escapes
    assert render_line({"s": "\udcff", 1: 2**70}) == reference_line({"s": "\udcff", 1: 2**70})


# One builder per way of splitting the request, kept across examples as in a server.
SHAPED = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor(), memo_size=16)
BY_FINGERPRINT = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor(), memo_size=16, shapes=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(front=st.sampled_from(FRONTS), path=paths, request_headers=headers, user=users,
       principal=st.sampled_from([workload("web"), workload("batch")]), request_id=st.one_of(ids, st.just(JWT)),
       port=st.integers(1024, 65535), result=results, message=messages, n=st.integers(0, 2**64))
def test_shape_templates_write_the_bytes_fingerprint_templates_write(
        front: Any, path: str, request_headers: dict[str, str], user: str | None, principal: str, request_id: str,
        port: int, result: Any, message: str, n: int) -> None:
    """Traffic that does not repeat takes a template per request shape (the method, path,
    headers and parsed_* redacted per request); a repeated one, the template of its fingerprint
    before shapes existed. Both write the same line, byte for byte, ``masked`` in the same order,
    whenever they kept the headers in the same order. (Requests that differ only in their
    headers' order have one fingerprint, and both kinds of template keep the order of the first
    one they saw; headers are sorted here, but a gRPC header map also iterates in an order that
    depends on which volatile headers were taken out of it, and the two builders evict at
    different times, so each may have seen a different first request. Then the lines still
    mean the same.)"""
    identity = identity_for(user, principal)
    request_headers = dict(sorted(request_headers.items()))
    lines = []
    for builder in (SHAPED, BY_FINGERPRINT):
        facts = front(path, request_headers, principal, request_id, port)
        decision = Decision(allowed=bool(result), code="allowed" if result else "policy_denied", reason=message,
                            http_status=200 if result else 403, decision_id=f"{n:032x}", identity=identity,
                            signals={}, result=result, policy_version="v1")
        lines.append(builder.build(decision, facts, NOW + n % 1000 / 7, handler_ns=5).line)
    assert meaning(lines[0]) == meaning(lines[1])
    if list(_headers_of(lines[0])) == list(_headers_of(lines[1])):
        assert lines[0] == lines[1]


def _headers_of(line: str) -> dict[str, Any]:
    http = json.loads(line).get("input", {}).get("attributes", {}).get("request", {}).get("http", {})
    return http.get("headers", {})


def test_timestamps_are_what_rfc3339_writes() -> None:
    """The builder formats a record's time without a datetime per record; the same text."""
    from authz_server.audit.builder import _Timestamps
    from authz_server.audit.record import rfc3339

    stamp = _Timestamps()
    moments = [NOW + k / 7 for k in range(2000)] + [NOW + 0.9999996, NOW + 0.9999995, NOW + 1.0000005,
                                                   NOW + 5e-7, NOW - 1e-7, 1.5e9 + 0.5e-6]
    for moment in moments:
        assert stamp(moment) == rfc3339(moment).encode()


# The record's C form (``_volatile_cut.record``) and its Python form (``RecordBuilder._fast``), one
# builder each, fed the same requests in the same order: what they keep evolves alike.
IN_C = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor(), memo_size=16)
IN_PYTHON = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor(), memo_size=16, in_c=False)
# a second's edges, where the microseconds round up into the next second, or down from it
MOMENTS = [NOW, NOW + 0.9999996, NOW + 0.9999995, NOW + 1.0000005, NOW + 5e-7, NOW - 1e-7, 1.5e9 + 0.5e-6]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(front=st.sampled_from(FRONTS), path=paths, request_headers=headers, user=users,
       principal=st.sampled_from([workload("web"), workload("batch")]), request_id=st.one_of(ids, st.just(JWT)),
       port=st.integers(0, 65535), signals_value=signals, result=st.one_of(st.none(), results), message=messages,
       policy_saw_input=st.booleans(), cached=st.booleans(), dry_run=st.booleans(),
       would_allow=st.sampled_from([True, False, None]), moment=st.one_of(st.sampled_from(MOMENTS),
                                                                          st.floats(1e9, 2e9)),
       handler_ns=st.one_of(st.integers(0, 10**9), st.just(2**63 - 1)), n=st.integers(0, 2**64))
def test_the_records_c_form_writes_the_python_forms_bytes(
        front: Any, path: str, request_headers: dict[str, str], user: str | None, principal: str, request_id: str,
        port: int, signals_value: dict[str, Any], result: Any, message: str, policy_saw_input: bool, cached: bool,
        dry_run: bool, would_allow: bool | None, moment: float, handler_ns: int, n: int) -> None:
    identity = identity_for(user, principal)
    records = []
    for builder in (IN_C, IN_PYTHON):
        facts = front(path, request_headers, principal, request_id, port)
        policy_input = None
        if policy_saw_input and not cached:
            try:
                policy_input = build_input(facts, identity.document, signals_value)
            except Exception:
                policy_input = None
        decision = Decision(allowed=bool(result), code="allowed" if result else "policy_denied", reason=message,
                            http_status=200 if result else 403, decision_id=f"{n:032x}", cached=cached,
                            identity=identity, signals=signals_value, result=result, policy_version=f"v{n % 3}",
                            input=policy_input, dry_run=dry_run, would_allow=would_allow)
        records.append(builder.build(decision, facts, moment, handler_ns=handler_ns))
    in_c, in_python = records
    assert in_c.line == in_python.line
    assert (in_c.decision_id, in_c.timestamp, in_c.subject, in_c.spiffe_id, in_c.allowed, in_c.code,
            in_c.policy_version) == (in_python.decision_id, in_python.timestamp, in_python.subject,
                                     in_python.spiffe_id, in_python.allowed, in_python.code, in_python.policy_version)


def test_the_c_form_makes_the_usual_record() -> None:
    """Not a pass by default: for a request of a shape seen before (no body, an inert path),
    repeated or not, the C form makes the record itself."""
    from authz_server.audit import builder as builder_module

    if builder_module._volatile_cut is None:
        pytest.skip("built without the C extension")
    builder = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor())
    identity = identity_for("alice", workload("web"))
    for request in range(4):
        facts = grpc_facts(f"/orders/{request % 3}?page=2", {"user-agent": "curl/8.5.0"}, workload("web"),
                           f"id-{request}", 40000 + request)
        decision = Decision(allowed=True, code="allowed", reason="ok", http_status=200, decision_id=f"d{request}",
                            identity=identity, signals={}, result=True, policy_version="v1")
        volatile = facts.attributes_factory.volatile  # type: ignore[union-attr]
        made = builder_module._volatile_cut.record(builder.c_state, decision, facts, volatile, NOW, 5)
        if request == 0:  # the shape's template is the Python form's to make
            assert made is None
            made = builder.build(decision, facts, NOW, handler_ns=5)
        assert made is not None
        assert meaning(made.line) == meaning(reference_line(Redactor().redact(build_document(
            decision, facts, NOW, handler_ns=5, path=PATH, labels=LABELS))))
