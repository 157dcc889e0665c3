"""Reading the policy's result strictly (OPA-Envoy ``envoyauth/response.go``): anything that is
not a decision is refused with ``policy_result_invalid``, never guessed at."""

from __future__ import annotations

from typing import Any

import pytest

from authz_server.decision import Decision
from authz_server.errors import PolicyError
from authz_server.response import Verdict, read_result


def test_booleans_are_decisions() -> None:
    assert read_result(True) == Verdict(allowed=True)
    assert read_result(False) == Verdict(allowed=False, http_status=403)


def test_the_full_object() -> None:
    verdict = read_result({
        "allowed": True, "headers": {"x-a": "1", "x-b": ["2", "3"]},
        "response_headers_to_add": [{"set-cookie": "a=1"}, {"set-cookie": "b=2"}],
        "request_headers_to_remove": ["authorization", "cookie"], "http_status": 200, "body": "",
        "dynamic_metadata": {"team": "blue", "n": [1, {"x": None}]},
        "query_parameters_to_set": {"lang": "en", "tag": ["a", "b"]}, "query_parameters_to_remove": ["debug"],
        "reason": "allowed_by_route", "something_else": {"ignored": True},  # unknown keys: ignored, as OPA-Envoy
    })
    assert verdict == Verdict(
        allowed=True, http_status=200, headers=(("x-a", "1"), ("x-b", "2"), ("x-b", "3")),
        response_headers_to_add=(("set-cookie", "a=1"), ("set-cookie", "b=2")),
        request_headers_to_remove=("authorization", "cookie"), body="",
        dynamic_metadata={"team": "blue", "n": [1, {"x": None}]},
        query_parameters_to_set=(("lang", "en"), ("tag", "a"), ("tag", "b")),
        query_parameters_to_remove=("debug",), reason="allowed_by_route")


def test_absent_and_null_optional_fields_mean_none() -> None:
    assert read_result({"allowed": False}) == Verdict(allowed=False)
    assert read_result({"allowed": True, "headers": None, "dynamic_metadata": None,
                        "request_headers_to_remove": None}) == Verdict(allowed=True)
    assert read_result({"allowed": False, "headers": {"x-empty": ""}, "headers_unused": 1}).headers == (("x-empty", ""),)


@pytest.mark.parametrize("status", [200, 302, 400, 401, 404, 429, 503, 511, 404.0])
def test_statuses_envoy_accepts(status: Any) -> None:
    assert read_result({"allowed": False, "http_status": status}).http_status == int(status)


INVALID: dict[str, Any] = {
    "undefined-like null": None,
    "a string": "true",
    "a number": 1,
    "a list": [True],
    "missing allowed": {"http_status": 403},
    "allowed as a string": {"allowed": "true"},
    "allowed as a number": {"allowed": 1},
    "allowed null": {"allowed": None},
    "status a string": {"allowed": False, "http_status": "403"},
    "status a bool": {"allowed": False, "http_status": True},
    "status a fraction": {"allowed": False, "http_status": 403.5},
    "status unknown to Envoy": {"allowed": False, "http_status": 418},
    "status 100": {"allowed": False, "http_status": 100},
    "status 0": {"allowed": False, "http_status": 0},
    "status 600": {"allowed": False, "http_status": 600},
    "status null": {"allowed": False, "http_status": None},
    "headers a list of strings": {"allowed": True, "headers": ["x-a: 1"]},
    "headers a string": {"allowed": True, "headers": "x-a: 1"},
    "header value a number": {"allowed": True, "headers": {"x-a": 1}},
    "header value a list of numbers": {"allowed": True, "headers": {"x-a": [1]}},
    "header value with CRLF": {"allowed": True, "headers": {"x-a": "1\r\nx-admin: true"}},
    "header value with LF": {"allowed": False, "headers": {"x-a": "1\nx"}},
    "header value with NUL": {"allowed": True, "response_headers_to_add": {"x-a": "1\u0000"}},
    "header name with a space": {"allowed": True, "headers": {"x a": "1"}},
    "header name with a colon": {"allowed": True, "headers": {"x:a": "1"}},
    "header name empty": {"allowed": True, "headers": {"": "1"}},
    "header name non-ASCII": {"allowed": True, "headers": {"x-\u00e9": "1"}},
    "response headers list holding a string": {"allowed": True, "response_headers_to_add": [{"a": "1"}, "b"]},
    "headers to remove a string": {"allowed": True, "request_headers_to_remove": "authorization"},
    "headers to remove with a number": {"allowed": True, "request_headers_to_remove": ["a", 1]},
    "body an object": {"allowed": False, "body": {"error": "no"}},
    "body null": {"allowed": False, "body": None},
    "dynamic_metadata a list": {"allowed": True, "dynamic_metadata": [1]},
    "dynamic_metadata a string": {"allowed": True, "dynamic_metadata": "x"},
    "query to set a list": {"allowed": True, "query_parameters_to_set": [["a", "b"]]},
    "query to set a number": {"allowed": True, "query_parameters_to_set": {"a": 1}},
    "query to set a list with a number": {"allowed": True, "query_parameters_to_set": {"a": ["b", 2]}},
    "query to remove an object": {"allowed": True, "query_parameters_to_remove": {"a": True}},
    "reason not a code": {"allowed": False, "reason": "Not A Code"},
    "reason with a dash": {"allowed": False, "reason": "rate-limited"},
    "reason too long": {"allowed": False, "reason": "a" * 65},
    "reason a number": {"allowed": False, "reason": 429},
    "reason null": {"allowed": False, "reason": None},
}


@pytest.mark.parametrize("result", INVALID.values(), ids=INVALID.keys())
def test_anything_else_is_refused(result: Any) -> None:
    with pytest.raises(PolicyError) as error:
        read_result(result)
    assert error.value.code == "policy_result_invalid"
    assert error.value.status == 403


def test_reason_codes() -> None:
    assert read_result({"allowed": False, "reason": ""}).reason == ""
    assert read_result({"allowed": False, "reason": "a" * 64}).reason == "a" * 64
    assert read_result({"allowed": False, "reason": "rate_limited_2"}).reason == "rate_limited_2"


def _decision(verdict: Verdict) -> Decision:
    return Decision(allowed=verdict.allowed, code="policy_denied", reason="denied by policy",
                    http_status=verdict.http_status, decision_id="d" * 32,
                    verdict=verdict)


def test_a_deny_without_a_body_answers_json_naming_the_code() -> None:
    decision = _decision(read_result({"allowed": False, "http_status": 429, "headers": {"retry-after": "2"}}))
    assert decision.body == '{"error":"policy_denied","message":"denied by policy","decision_id":"' + "d" * 32 + '"}'
    assert decision.response_headers == (("retry-after", "2"), ("content-type", "application/json"))


def test_a_deny_with_the_policys_body_or_content_type_is_passed_as_is() -> None:
    with_body = _decision(read_result({"allowed": False, "body": "<h1>no</h1>", "headers": {"x-a": "1"}}))
    assert (with_body.body, with_body.response_headers) == ("<h1>no</h1>", (("x-a", "1"),))
    typed = _decision(read_result({"allowed": False, "headers": {"Content-Type": "text/plain"}}))
    assert (typed.body, typed.response_headers) == ("", (("Content-Type", "text/plain"),))


def test_an_allow_never_carries_a_body_or_deny_headers_upstream() -> None:
    decision = _decision(read_result({"allowed": True, "body": "ignored", "http_status": 401,
                                      "headers": {"x-a": "1"}, "response_headers_to_add": {"x-b": "2"}}))
    assert decision.body == ""
    assert decision.upstream_headers == (("x-a", "1"),)
    assert decision.response_headers == (("x-b", "2"),)


def test_the_status_table_is_envoys_enum() -> None:
    """response.py writes Envoy's StatusCode values out (the core imports no protobuf); they
    must stay the enum's, or Envoy drops an answer we thought valid."""
    from envoy.type.v3 import http_status_pb2

    from authz_server.response import VALID_STATUS

    assert VALID_STATUS == {v.number for v in http_status_pb2.StatusCode.DESCRIPTOR.values if v.number >= 200}
