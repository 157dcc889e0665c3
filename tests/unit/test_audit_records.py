"""Audit records built with the redacted parts kept across requests (RecordBuilder) are the
records the whole path builds and redacts afresh: same document, same masked and erased
pointers, no secret anywhere, and each request's own volatile values (request id, port,
tracing headers), however many requests share a fingerprint."""

from __future__ import annotations

import json
from typing import Any

import pytest

from authz_server.audit.builder import RecordBuilder
from authz_server.audit.record import build_document
from authz_server.audit.redact import Redactor
from authz_server.decision import Decision, Identity
from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.facts import Facts
from authz_server.http import HttpRequest
from authz_server.httpfront import facts_from_http
from tests.support.audit import a_jwt, assert_no_secret, check_request_json, secret_headers, secret_path, workload

NOW = 1_790_000_000.0
LABELS = {"app": "authz-server", "id": "test", "version": "0"}
PATH = "envoy/authz/allow"
SESSION_ID = "s3ss10n-" + "x" * 40
IDENTITY = Identity({
    "method": "session", "workload": {"spiffe_id": workload("frontend")},
    "user": {"sub": "alice", "claims": {"sub": "alice", "note": f"Bearer {'t0ken' * 4}"}},
    # Anything but id_sha256, created, expires and bound_to is erased from a session.
    "session": {"id_sha256": "ab" * 32, "created": NOW, "expires": NOW + 60, "bound_to": {}, "raw_id": SESSION_ID},
    "delegation": [],
}, fingerprint=b"alice-frontend")


HEADERS, SECRETS = secret_headers(SESSION_ID)
TARGET, PATH_SECRETS = secret_path("/orders/7")


def decision(n: int, identity: Identity = IDENTITY, signals: dict[str, Any] | None = None) -> Decision:
    return Decision(allowed=True, code="allowed", reason="allowed by policy", http_status=200, decision_id=f"{n:032x}",
                    cached=True, identity=identity,
                    signals=signals or {"rate": {"remaining": 100 - n}}, result=True, policy_version="v1")


def whole_path(d: Decision, facts: Facts) -> dict[str, Any]:
    return Redactor().redact(build_document(d, facts, NOW, handler_ns=1, path=PATH, labels=LABELS))


def normalised(document: dict[str, Any]) -> dict[str, Any]:
    return {**document, "masked": sorted(document.get("masked", [])), "erased": sorted(document.get("erased", []))}


def grpc_facts(n: int, secret: str, *, raw_headers: bool = False, path: str | None = None) -> tuple[Facts, list[str]]:
    headers, secrets = HEADERS, SECRETS
    target, path_secrets = (TARGET, PATH_SECRETS) if path is None else (path, [])
    volatile = {"x-request-id": secret, "traceparent": f"00-{n:032x}-{n:016x}-01"}
    document = check_request_json(target, principal=workload("frontend"), headers={**headers, **volatile},
                                  request_id=secret)
    document["attributes"]["source"]["address"]["socketAddress"]["portValue"] = 40000 + n
    if raw_headers:
        http = document["attributes"]["request"]["http"]
        http["headerMap"] = {"headers": [{"key": k, "value": v} for k, v in http.pop("headers").items()]}
    return facts_from_check_request(check_request_from_json(document)), secrets + path_secrets + _token(secret)


def http_facts(n: int, secret: str) -> tuple[Facts, list[str]]:
    headers, secrets, target, path_secrets = HEADERS, SECRETS, TARGET, PATH_SECRETS
    request = HttpRequest("GET", target, {**headers, "host": "orders", "x-request-id": secret,
                                          "traceparent": f"00-{n:032x}-{n:016x}-01",
                                          "x-forwarded-for": "10.0.0.7", "x-authz-ctx-service": "orders"})
    return facts_from_http(request, ""), secrets + path_secrets + _token(secret)


def _token(request_id: str) -> list[str]:
    return [request_id] if request_id.startswith("ey") else []


@pytest.mark.parametrize("make", [
    pytest.param(lambda n, s: grpc_facts(n, s), id="grpc"),
    pytest.param(lambda n, s: grpc_facts(n, s, raw_headers=True), id="grpc-raw-headers"),
    pytest.param(lambda n, s: grpc_facts(n, s, path="/orders/%zz"), id="grpc-bad-escape"),
    pytest.param(http_facts, id="http"),
])
def test_kept_parts_give_the_same_records_as_the_whole_path(make: Any) -> None:
    builder = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor())
    fingerprints = set()
    for n in range(4):
        # The request id is attacker-chosen: a token there is redacted on every request.
        secret = a_jwt(f"req-{n}") if n % 2 else f"plain-request-id-{n}"
        facts, secrets = make(n, secret)
        fingerprints.add(facts.fingerprint)
        d = decision(n)
        expected = whole_path(d, make(n, secret)[0])
        record = builder.build(d, facts, NOW, handler_ns=1)
        assert normalised(dict(record.document)) == normalised(expected)
        assert json.loads(record.line) == json.loads(json.dumps(record.document, default=str))
        assert_no_secret(record.line, secrets + [SESSION_ID, "t0ken" * 4])
        assert "/input/identity/session/raw_id" in record.document["erased"]
        assert record.document["input"].get("signals", d.signals) == {"rate": {"remaining": 100 - n}}
        http = record.document["input"]["attributes"]["request"]["http"]
        if "headers" in http:  # this request's own tracing header, not the first one's
            assert http["headers"]["traceparent"] == f"00-{n:032x}-{n:016x}-01"
    assert len(fingerprints) == 1  # every request repeated the first one's fingerprint


def test_another_identity_on_the_same_request_is_redacted_afresh() -> None:
    builder = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor())
    facts, _ = grpc_facts(1, "id-1")
    builder.build(decision(1), facts, NOW, handler_ns=1)
    bob = Identity({**IDENTITY.document, "user": {"sub": "bob", "claims": {"sub": "bob"}}}, fingerprint=b"bob")
    facts, _ = grpc_facts(2, "id-2")
    record = builder.build(decision(2, bob), facts, NOW, handler_ns=1)
    assert record.subject == "bob"
    assert record.document["input"]["identity"]["user"]["sub"] == "bob"
    assert normalised(dict(record.document)) == normalised(whole_path(decision(2, bob), grpc_facts(2, "id-2")[0]))


def test_what_is_kept_is_bounded() -> None:
    builder = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor(), memo_size=8)
    for n in range(50):
        facts, _ = grpc_facts(n, f"id-{n}", path=f"/orders/{n}")
        identity = Identity(IDENTITY.document, fingerprint=f"identity-{n}".encode())
        record = builder.build(decision(n, identity), facts, NOW, handler_ns=1)
        assert record.document["input"]["parsed_path"] == ["orders", str(n)]
    assert len(builder._templates) <= 8 and len(builder._identities) <= 8


def test_an_uncached_decision_keeps_the_input_the_policy_saw() -> None:
    facts, _ = grpc_facts(1, "request-1")
    policy_input = {"attributes": {"request": {"http": {"headers": {"authorization": "Bearer " + "q" * 20}}}},
                    "identity": {}, "signals": {}}
    d = Decision(allowed=False, code="policy_denied", reason="denied by policy", http_status=403, decision_id="0" * 32,
                 identity=IDENTITY,
                 input=policy_input, result=False)
    record = RecordBuilder(path=PATH, labels=LABELS, redactor=Redactor()).build(d, facts, NOW, handler_ns=1)
    assert record.document["input"]["attributes"] == {
        "request": {"http": {"headers": {"authorization": "Bearer [REDACTED]"}}}}
    assert record.document["masked"] == ["/input/attributes/request/http/headers/authorization"]
