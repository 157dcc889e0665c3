"""CheckRequest → Facts (the cache fingerprint) and Decision → CheckResponse, as Envoy sees them."""

from __future__ import annotations

import asyncio
import base64
import copy
from pathlib import Path
from typing import Any

import pytest

from authz_server.decision import DECISION_ID_HEADER, DecisionSettings, Identity, Pipeline
from authz_server.envoy import (INVALID_ARGUMENT, OK, PERMISSION_DENIED, UNAUTHENTICATED, UNAVAILABLE, CheckResponse,
                                check_request_from_json, check_response, check_response_bytes,
                                facts_from_check_request)
from authz_server.errors import IdentityError, RequestError, TokenError, UnavailableError
from authz_server.facts import Facts
from authz_server.policy.loader import PolicyRuntime
from tests.support.authz import write_policy

BASE: dict[str, Any] = {"attributes": {
    "source": {"address": {"socketAddress": {"address": "10.0.0.7", "portValue": 51234}},
               "principal": "spiffe://example.org/frontend"},
    "destination": {"address": {"socketAddress": {"address": "10.0.0.9", "portValue": 8080}},
                    "principal": "spiffe://example.org/orders"},
    "request": {
        "time": "2025-05-01T12:00:00.250Z",
        "http": {
            "id": "13359530607844510314", "method": "GET", "path": "/orders/42?expand=items",
            "host": "orders.local", "scheme": "http", "protocol": "HTTP/1.1",
            "headers": {":authority": "orders.local", ":method": "GET", ":path": "/orders/42?expand=items",
                        "accept": "*/*", "x-request-id": "6f1c3a5e-0c55-4d8e-9a54-4a7e2f0f6a11",
                        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                        "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7"},
        },
    },
    "contextExtensions": {"service": "orders"},
}}


def variant(change) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    document = copy.deepcopy(BASE)
    change(document["attributes"])
    return document


def facts(document: dict[str, Any]) -> Facts:
    return facts_from_check_request(check_request_from_json(document))


def raw_form(document: dict[str, Any]) -> dict[str, Any]:
    """The same request as Envoy sends it with ``encode_raw_headers``: a header_map of raw values."""
    document = copy.deepcopy(document)
    http = document["attributes"]["request"]["http"]
    headers = http.pop("headers")
    http["headerMap"] = {"headers": [{"key": k, "rawValue": base64.b64encode(v.encode()).decode()}
                                     for k, v in headers.items()]}
    return document


def _http(a: dict[str, Any]) -> dict[str, Any]:
    return a["request"]["http"]


VOLATILE_ONLY = {
    "http.id": lambda a: _http(a).update(id="99"),
    "request time": lambda a: a["request"].update(time="2031-01-01T00:00:00Z"),
    "no request time": lambda a: a["request"].pop("time"),
    "source port": lambda a: a["source"]["address"]["socketAddress"].update(portValue=40000),
    "x-request-id": lambda a: _http(a)["headers"].update({"x-request-id": "another"}),
    "trace headers": lambda a: _http(a)["headers"].update({
        "traceparent": "00-11111111111111111111111111111111-2222222222222222-00", "x-b3-spanid": "1",
        "x-datadog-trace-id": "7", "x-envoy-attempt-count": "2"}),
}

MEANINGFUL = {
    "method": lambda a: _http(a).update(method="POST"),
    "path": lambda a: _http(a).update(path="/orders/43?expand=items"),
    "query": lambda a: _http(a).update(path="/orders/42?expand=none"),
    "a header": lambda a: _http(a)["headers"].update({"x-role": "admin"}),
    "a header's value": lambda a: _http(a)["headers"].update({"accept": "text/html"}),
    "body": lambda a: _http(a).update(body='{"a": 1}'),
    "source address": lambda a: a["source"]["address"]["socketAddress"].update(address="10.0.0.8"),
    "source principal": lambda a: a["source"].update(principal="spiffe://example.org/intruder"),
    "destination port": lambda a: a["destination"]["address"]["socketAddress"].update(portValue=8081),
    "context extension": lambda a: a["contextExtensions"].update(service="payments"),
    "metadata": lambda a: a.update(metadataContext={"filterMetadata": {"f": {"k": "v"}}}),
}


@pytest.mark.parametrize("form", [lambda d: d, raw_form], ids=["headers", "header_map"])
@pytest.mark.parametrize("change", VOLATILE_ONLY.values(), ids=VOLATILE_ONLY.keys())
def test_fingerprint_ignores_per_request_noise(form, change) -> None:  # type: ignore[no-untyped-def]
    assert facts(form(variant(change))).fingerprint == facts(form(BASE)).fingerprint


@pytest.mark.parametrize("form", [lambda d: d, raw_form], ids=["headers", "header_map"])
@pytest.mark.parametrize("change", MEANINGFUL.values(), ids=MEANINGFUL.keys())
def test_fingerprint_changes_with_anything_else(form, change) -> None:  # type: ignore[no-untyped-def]
    assert facts(form(variant(change))).fingerprint != facts(form(BASE)).fingerprint


def test_volatile_fields_are_still_in_the_input_and_the_facts() -> None:
    built = facts(BASE)
    attributes = built.attributes()
    http = attributes["request"]["http"]
    assert http["id"] == "13359530607844510314"
    assert http["headers"]["x-request-id"] == "6f1c3a5e-0c55-4d8e-9a54-4a7e2f0f6a11"
    assert http["headers"]["traceparent"].startswith("00-0af7")
    assert attributes["request"]["time"] == {"seconds": 1746100800, "nanos": 250_000_000}
    assert attributes["source"]["address"]["socketAddress"] == {"address": "10.0.0.7", "portValue": 51234}
    assert (built.request_id, built.source_address, built.source_port) == ("13359530607844510314", "10.0.0.7", 51234)
    # Only the parts a policy reads, with the volatile ones put back where they belong.
    assert facts(BASE).attributes({"request": {"http": {"id": True, "headers": {"x-request-id": True}}}}) == {
        "request": {"http": {"id": "13359530607844510314",
                             "headers": {"x-request-id": "6f1c3a5e-0c55-4d8e-9a54-4a7e2f0f6a11"}}}}


def test_raw_header_form_keeps_request_id_and_port_for_the_audit_record() -> None:
    built = facts(raw_form(BASE))
    assert (built.request_id, built.source_port) == ("13359530607844510314", 51234)
    assert built.header("x-request-id") == "6f1c3a5e-0c55-4d8e-9a54-4a7e2f0f6a11"
    attributes = built.attributes()
    assert attributes["request"]["http"]["id"] == "13359530607844510314"  # exactly as sent, once
    assert "headers" not in attributes["request"]["http"]
    assert attributes["source"]["address"]["socketAddress"]["portValue"] == 51234


def test_raw_header_values_that_are_not_utf8_are_read_with_replacement() -> None:
    document = raw_form(BASE)
    document["attributes"]["request"]["http"]["headerMap"]["headers"].append(
        {"key": "X-Odd", "rawValue": base64.b64encode(b"a\xffb").decode()})
    document["attributes"]["request"]["http"]["headerMap"]["headers"].append(
        {"key": "x-odd", "value": "second"})
    assert facts(document).header("x-odd") == "a\ufffdb,second"


# -- Decision → CheckResponse

ALLOW_POLICY = """
package envoy.authz
import rego.v1
default allow := false
allow := {"allowed": true, "headers": {"x-a": "1", "X-Authz-Subject": "from-policy"},
          "response_headers_to_add": {"set-cookie": ["a=1", "b=2"]},
          "request_headers_to_remove": ["authorization"],
          "query_parameters_to_set": {"lang": "en"}, "query_parameters_to_remove": ["debug"],
          "dynamic_metadata": {"team": "blue"}} if input.parsed_path[0] == "full"
allow if input.parsed_path[0] == "plain"
allow := {"allowed": false, "http_status": 429, "body": "short and stout", "headers": {"x-why": "teapot"}} if {
    input.parsed_path[0] == "teapot"
}
"""


class Resolver:
    """An identity phase that answers what it is told (a real IdentityResolver)."""

    def __init__(self, outcome: Identity | Exception) -> None:
        self.outcome = outcome

    async def resolve(self, facts: Facts, now: float) -> Identity:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder: Path = tmp_path_factory.mktemp("policies")
    write_policy(folder, ALLOW_POLICY)
    runtime = PolicyRuntime(str(folder), isolation="inline")
    runtime.load()
    yield runtime
    runtime.close()


def decide(runtime: PolicyRuntime, path: str, identity: Identity | Exception | None = None,
           settings: DecisionSettings | None = None):  # type: ignore[no-untyped-def]
    pipeline = Pipeline(runtime, settings=settings, identity=Resolver(identity) if identity is not None else None)
    request = check_request_from_json({"attributes": {"request": {"http": {"method": "GET", "path": path}}}})
    return asyncio.run(pipeline.decide(facts_from_check_request(request), now=1000.0))


def header_values(options: Any, name: str) -> list[str]:
    return [o.header.value for o in options if o.header.key == name]


def test_allow_renders_every_field_of_the_policy_result(runtime: PolicyRuntime) -> None:
    decision = decide(runtime, "/full")
    response = check_response(decision)
    assert response.status.code == OK
    ok = response.ok_response
    upstream = {o.header.key: (o.header.value, o.append_action) for o in ok.headers}
    overwrite = ok.headers[0].OVERWRITE_IF_EXISTS_OR_ADD
    assert upstream["x-a"] == ("1", overwrite)
    assert upstream[DECISION_ID_HEADER] == (decision.decision_id, overwrite)
    assert header_values(ok.response_headers_to_add, "set-cookie") == ["a=1", "b=2"]
    assert all(o.append_action == o.APPEND_IF_EXISTS_OR_ADD for o in ok.response_headers_to_add)
    assert [(p.key, p.value) for p in ok.query_parameters_to_set] == [("lang", "en")]
    assert list(ok.query_parameters_to_remove) == ["debug"]
    assert response.dynamic_metadata["team"] == "blue"
    assert response.dynamic_metadata["decision_id"] == decision.decision_id
    # The policy set x-authz-subject itself (in its own casing): it is not also removed.
    assert "authorization" in ok.headers_to_remove
    assert "x-authz-spiffe-id" in ok.headers_to_remove
    assert "x-authz-subject" not in ok.headers_to_remove


def test_identity_headers_we_did_not_set_are_removed(runtime: PolicyRuntime) -> None:
    plain = check_response(decide(runtime, "/plain")).ok_response
    assert set(plain.headers_to_remove) >= {"x-authz-subject", "x-authz-spiffe-id"}
    assert [o.header.key for o in plain.headers] == [DECISION_ID_HEADER]

    workload = Identity({"method": "mtls"}, upstream_headers=(("x-authz-spiffe-id", "spiffe://example.org/a"),),
                        headers_to_remove=("authorization",))
    ok = check_response(decide(runtime, "/plain", workload)).ok_response
    assert header_values(ok.headers, "x-authz-spiffe-id") == ["spiffe://example.org/a"]
    assert "x-authz-spiffe-id" not in ok.headers_to_remove
    assert set(ok.headers_to_remove) == {"authorization", "x-authz-subject"}


def test_a_policy_deny_carries_its_status_body_and_headers(runtime: PolicyRuntime) -> None:
    decision = decide(runtime, "/teapot")
    response = check_response(decision)
    assert (response.status.code, response.status.message) == (PERMISSION_DENIED, "policy_denied")
    denied = response.denied_response
    assert (denied.status.code, denied.body) == (429, "short and stout")
    assert header_values(denied.headers, "x-why") == ["teapot"]
    assert header_values(denied.headers, DECISION_ID_HEADER) == [decision.decision_id]
    assert not response.HasField("ok_response")


@pytest.mark.parametrize(("path", "identity", "settings", "grpc_code", "http_status", "code"), [
    ("/nothing", None, None, PERMISSION_DENIED, 403, "policy_denied"),
    ("/nothing", None, DecisionSettings(deny_status=404), PERMISSION_DENIED, 403, "policy_denied"),
    ("/nothing", None, DecisionSettings(explain_policy_denies=True), PERMISSION_DENIED, 403, "policy_denied"),
    ("/plain", TokenError("expired", code="expired_token"), None, UNAUTHENTICATED, 401, "expired_token"),
    ("/plain", UnavailableError("redis is down", code="session_store_unavailable"), None, UNAVAILABLE, 503,
     "session_store_unavailable"),
    ("/plain", RequestError("odd", code="bad_header"), None, INVALID_ARGUMENT, 400, "bad_header"),
    ("/plain", RuntimeError("a bug"), DecisionSettings(deny_status=500), PERMISSION_DENIED, 500, "internal_error"),
], ids=["policy", "policy-ignores-deny_status", "policy-explained", "identity", "unavailable", "request", "internal"])
def test_the_phase_that_failed_sets_the_answer(runtime: PolicyRuntime, path, identity, settings, grpc_code,
                                               http_status, code) -> None:  # type: ignore[no-untyped-def]
    decision = decide(runtime, path, identity, settings)
    response = check_response(decision)
    assert (response.status.code, response.status.message) == (grpc_code, code)
    assert response.denied_response.status.code == http_status
    headers = {o.header.key: o.header.value for o in response.denied_response.headers}
    assert headers[DECISION_ID_HEADER] == decision.decision_id
    if code == "policy_denied" and not (settings and settings.explain_policy_denies):
        # As OPA-Envoy answers a deny the policy made without a body: nothing but its status.
        assert response.denied_response.body == "" and "content-type" not in headers
        return
    assert headers["content-type"] == "application/json"
    assert f'"error":"{code}"' in response.denied_response.body
    if isinstance(identity, IdentityError):
        assert headers["www-authenticate"] == f'Bearer error="invalid_token", error_description="{code}"'
    else:
        assert "www-authenticate" not in headers


def test_undecodable_request_is_a_400_without_asking_the_policy(runtime: PolicyRuntime) -> None:
    from authz_server.envoy import parse_check_request

    pipeline = Pipeline(runtime)
    with pytest.raises(RequestError) as error:
        parse_check_request(b"\x0a\x05\x12")
    decision = pipeline.refuse(error.value, now=1.0)
    response = CheckResponse.FromString(check_response_bytes(decision))
    assert (response.status.code, response.status.message) == (INVALID_ARGUMENT, "malformed_request")
    assert response.denied_response.status.code == 400


def test_memoized_allow_answers_like_a_fresh_rendering(runtime: PolicyRuntime) -> None:
    pipeline = Pipeline(runtime)

    def one():  # type: ignore[no-untyped-def]
        request = check_request_from_json({"attributes": {"request": {"http": {"method": "GET", "path": "/full"}}}})
        return asyncio.run(pipeline.decide(facts_from_check_request(request), now=1000.0))

    first = one()
    assert not first.cached
    check_response_bytes(one())
    for _ in range(3):
        hit = one()
        assert hit.cached and hit.memo and "grpc" in hit.memo
        assert CheckResponse.FromString(check_response_bytes(hit)) == check_response(hit)


@pytest.mark.parametrize(("path", "identity", "settings"), [
    ("/plain", None, None), ("/full", None, None), ("/teapot", None, None), ("/nothing", None, None),
    ("/nothing", None, DecisionSettings(explain_policy_denies=True)), ("/teapot", None, DecisionSettings(dry_run=True)),
    ("/plain", Identity({"method": "mtls"}, upstream_headers=(("x-authz-spiffe-id", "spiffe://example.org/a"),),
                        headers_to_remove=("authorization",), response_headers=(("x-session-id", "s1"),)), None),
    ("/plain", TokenError("expired", code="expired_token"), None),
], ids=["plain", "full", "teapot", "bare-deny", "explained-deny", "dry-run", "identity", "identity-error"])
def test_shared_renderings_answer_like_a_fresh_one(runtime: PolicyRuntime, path, identity, settings) -> None:  # type: ignore[no-untyped-def]
    # Each answer twice (the second from a rendering kept by the first), each with its own decision id.
    for _ in range(2):
        decision = decide(runtime, path, identity, settings)
        assert CheckResponse.FromString(check_response_bytes(decision)) == check_response(decision)
