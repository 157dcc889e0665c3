"""The policy test runner: Rego ``test_*`` rules, run natively by OPA, and ``*_test.yaml``
case files, as ``opa test`` would report them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from authz_server.policy.source import CacheSettings, PolicySet
from authz_server.policy import testing
from authz_server.envoy import input_from_request_json
from authz_server.policy.testing import run_policy_tests

Report = testing.TestReport  # not collected as a test class

POLICY = """package envoy.authz
import rego.v1

default allow := false

allow if {
    input.attributes.request.http.method == "GET"
    startswith(input.attributes.request.http.path, "/public")
}

allow if {
    input.attributes.request.http.method == "POST"
    input.parsed_body.role in data.roles.writers
}

status := 429 if input.parsed_path[0] == "busy"

conflict := 1 if input.x
conflict := 2 if input.x
"""

TESTS = '''package envoy.authz_test
import rego.v1
import data.envoy.authz

# A multi-line input: the common OPA idiom.
test_get_public if {
    authz.allow with input as {"attributes": {"request": {"http": {
        "method": "GET",
        "path": "/public/x",
    }}}}
}

test_one_line if authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/public"}}}}

test_post_denied if {
    not authz.allow with input as {"attributes": {"request": {"http": {"method": "POST", "path": "/public"}}}}
}

test_input_and_data if {
    authz.allow with input as {"attributes": {"request": {"http": {"method": "POST"}}}, "parsed_body": {"role": "ops"}}
        with data.roles.writers as ["ops"]
}

test_input_from_data if {
    authz.allow with input as data.fixtures.public_get
}

test_same_input_twice if {
    authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/public/a"}}}}
    not authz.conflict with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/public/a"}}}}
}

test_no_input if not authz.allow

test_text_is_not_code if {
    note := "with input as {}"
    note != ""
}

test_fails if {
    authz.allow with input as {"attributes": {"request": {"http": {"method": "DELETE", "path": "/public"}}}}
}

test_undefined if {
    authz.status == 429 with input as {"parsed_path": ["idle"]}
}

test_conflict if {
    authz.conflict with input as {"x": true}
}

todo_test_later if {
    false
}
'''

DATA = {"roles": {"writers": ["admin"]},
        "fixtures": {"public_get": {"attributes": {"request": {"http": {"method": "GET", "path": "/public/b"}}}}}}


def policy_set(modules: dict[str, str], data: dict[str, Any] | None = None,
               cases: dict[str, Any] | None = None) -> PolicySet:
    return PolicySet(modules=modules, data=data or {}, test_cases=cases or {}, cache=CacheSettings(), version="t")


def outcomes(report: Report) -> dict[str, tuple[str, str]]:
    return {r.name.rsplit(".", 1)[-1] if r.name.startswith("data.") else r.name: (r.outcome, r.detail)
            for r in report.results}


@pytest.fixture(scope="module")
def report() -> Report:
    return run_policy_tests(policy_set({"policy.rego": POLICY, "policy_test.rego": TESTS}, DATA),
                            "data.envoy.authz.allow")


@pytest.mark.parametrize("name", ["test_get_public", "test_one_line", "test_post_denied", "test_input_and_data",
                                  "test_input_from_data", "test_same_input_twice", "test_no_input",
                                  "test_text_is_not_code"])
def test_passing_rules(report: Report, name: str) -> None:
    assert outcomes(report)[name] == ("pass", "")


def test_failures_say_what_the_rule_evaluated_to(report: Report) -> None:
    found = outcomes(report)
    assert found["test_fails"] == ("fail", "evaluated to undefined")
    assert found["test_undefined"] == ("fail", "evaluated to undefined")
    outcome, detail = found["test_conflict"]
    assert outcome == "error" and detail
    assert not report.ok
    assert {r.name for r in report.failures} == {"data.envoy.authz_test.test_fails",
                                                 "data.envoy.authz_test.test_undefined",
                                                 "data.envoy.authz_test.test_conflict"}


def test_names_locations_and_skips(report: Report) -> None:
    assert all(r.location == "policy_test.rego" for r in report.results)
    assert outcomes(report)["todo_test_later"] == ("skip", "todo_test_ rule")  # reported, never a failure
    assert len(report.results) == 12
    as_json = report.to_json()
    assert as_json["ok"] is False and len(as_json["results"]) == 12
    json.dumps(as_json)


SEVERAL = '''package envoy.authz_test
import rego.v1
import data.envoy.authz

test_several_inputs if {
    authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/public"}}}}
    not authz.allow with input as {"attributes": {"request": {"http": {"method": "POST", "path": "/public"}}}}
}

test_after_it if authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/public"}}}}

test_twice if authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/public"}}}}

test_twice if authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/public/2"}}}}

test_local_input if {
    request := {"attributes": {"request": {"http": {"method": "GET", "path": "/public"}}}}
    authz.allow with input as request
}
'''


def test_every_with_form_runs_as_opa_runs_it() -> None:
    """Several inputs in one test, a rule defined twice, an input bound to a local: OPA takes them all."""
    report = run_policy_tests(policy_set({"policy.rego": POLICY, "several_test.rego": SEVERAL}),
                              "data.envoy.authz.allow")
    assert outcomes(report) == {name: ("pass", "") for name in
                                ("test_several_inputs", "test_after_it", "test_twice", "test_local_input")}


PARAMETRIZED = '''package params_test
import rego.v1

test_paths[path] := result if {
    some path in ["/public", "/public/a", "/private"]
    result := startswith(path, "/public")
}
'''


def test_a_parametrized_test_fails_naming_the_cases_that_are_not_true() -> None:
    report = run_policy_tests(policy_set({"policy.rego": POLICY, "p_test.rego": PARAMETRIZED}), "data.envoy.authz.allow")
    assert outcomes(report)["test_paths"] == ("fail", "not true for /private")


def test_a_module_that_does_not_compile_fails_the_run_naming_its_line() -> None:
    broken = "package broken_test\nimport rego.v1\ntest_x if {\n    input.a ==\n}\n"
    report = run_policy_tests(policy_set({"policy.rego": POLICY, "a_test.rego": broken,
                                          "b_test.rego": "package b_test\nimport rego.v1\ntest_ok if true\n"}),
                              "data.envoy.authz.allow")
    assert [(r.outcome, r.detail.split(": ")[0]) for r in report.results] == [("error", "a_test.rego:5")]
    assert not report.ok


# -- case files

CASES = {
    "query": "data.envoy.authz.allow",
    "cases": [
        {"name": "a plain input", "input": {"attributes": {"request": {"http": {"method": "GET", "path": "/public"}}}},
         "expect": True},
        {"name": "an ext_authz request", "request": {"attributes": {"request": {"http": {
            "method": "POST", "path": "/people", "headers": {"content-type": "application/json"},
            "body": '{"role": "admin"}'}}}}, "expect": True},
        {"name": "a deny", "input": {}, "expect": False},
        {"name": "wrong expectation", "input": {}, "expect": True},
        {"name": "one is not true", "input": {"attributes": {"request": {"http": {"method": "GET",
                                                                                  "path": "/public"}}}}, "expect": 1},
        {"name": "no expectation", "input": {}},
        {"name": "no input", "expect": True},
        "not a case",
    ],
}

STATUS_CASES = {
    "query": "data.envoy.authz.result",
    "cases": [
        {"name": "subset of an object", "input": {"parsed_path": ["busy"]}, "expect": {"allowed": False, "http_status": 429}},
        {"name": "a missing key fails", "input": {"parsed_path": ["busy"]}, "expect": {"headers": {}}},
        {"name": "undefined expected", "input": {"parsed_path": ["x"]}, "expect_undefined": True},
        {"name": "undefined when defined", "input": {"parsed_path": ["busy"]}, "expect_undefined": True},
    ],
}

RESULT = 'package envoy.authz\nimport rego.v1\nresult := {"allowed": false, "http_status": 429, "body": ""} if ' \
         'input.parsed_path[0] == "busy"\n'


def test_case_files() -> None:
    report = run_policy_tests(policy_set({"policy.rego": POLICY, "result.rego": RESULT}, DATA,
                                         {"allow_test.yaml": CASES, "status_test.yaml": STATUS_CASES,
                                          "broken_test.yaml": {"cases": "nope"},
                                          "badquery_test.yaml": {"query": "allow", "cases": [{"input": {}, "expect": True}]},
                                          "numberquery_test.yaml": {"query": 1, "cases": [{"input": {}, "expect": 1}]}}),
                              "data.envoy.authz.allow", read_request=input_from_request_json)
    found = outcomes(report)
    assert found["allow_test.yaml#a plain input"] == ("pass", "")
    assert found["allow_test.yaml#an ext_authz request"] == ("pass", "")  # built exactly as the server builds it
    assert found["allow_test.yaml#a deny"] == ("pass", "")
    assert found["allow_test.yaml#wrong expectation"] == ("fail", "expected true, got false")
    assert found["allow_test.yaml#one is not true"] == ("fail", "expected 1, got true")
    assert found["allow_test.yaml#no expectation"] == ("error", "a case needs 'expect' or 'expect_undefined'")
    assert found["allow_test.yaml#no input"] == ("error", "a case needs 'input' or 'request'")
    assert found["allow_test.yaml#7"] == ("error", "a case must be an object")
    assert found["status_test.yaml#subset of an object"] == ("pass", "")
    assert found["status_test.yaml#a missing key fails"][0] == "fail"
    assert found["status_test.yaml#undefined expected"] == ("pass", "")
    assert found["status_test.yaml#undefined when defined"][0] == "fail"
    assert found["broken_test.yaml"] == ("error", "expected a 'cases' list")
    assert found["badquery_test.yaml"] == (
        "error", "query must be a data reference like data.envoy.authz.allow, got 'allow'")
    assert found["numberquery_test.yaml"] == ("error", "'query' must be a string, got 1")


def test_a_case_request_the_server_would_refuse_is_an_error() -> None:
    cases = {"cases": [{"name": "bad escape", "request": {"attributes": {"request": {"http": {"path": "/%zz"}}}},
                        "expect": False}]}
    report = run_policy_tests(policy_set({"policy.rego": POLICY}, cases={"x_test.yaml": cases}),
                              "data.envoy.authz.allow", read_request=input_from_request_json)
    [result] = report.results
    assert (result.outcome, result.detail) == ("error", "invalid URL escape at offset 1 in path")


def test_a_malformed_case_is_an_error_not_a_crash() -> None:
    cases = {"cases": [{"name": "request as text", "request": "GET /", "expect": False},
                       {"name": "identity as a list", "request": {}, "identity": ["x"], "expect": False},
                       {"name": "not a CheckRequest", "request": {"attributes": {"nope": 1}}, "expect": False},
                       {"name": "fine", "input": {}, "expect": False}]}
    report = run_policy_tests(policy_set({"policy.rego": POLICY}, cases={"x_test.yaml": cases}),
                              "data.envoy.authz.allow", read_request=input_from_request_json)
    found = outcomes(report)
    assert found["x_test.yaml#request as text"][1].startswith("invalid case: ")
    assert found["x_test.yaml#identity as a list"][1].startswith("invalid case: ")
    assert found["x_test.yaml#not a CheckRequest"][1].startswith("malformed CheckRequest JSON")
    assert [r.outcome for r in report.results] == ["error", "error", "error", "pass"]


def test_inputs_with_quotes_and_backslashes_reach_the_rule_unchanged() -> None:
    policy = 'package t\nimport rego.v1\nsame if input.s == "say \\"hi\\" \\\\ \\n"\n'
    tests = ('package t_test\nimport rego.v1\nimport data.t\n'
             'test_same if t.same with input as {"s": "say \\"hi\\" \\\\ \\n"}\n'
             'test_other if not t.same with input as {"s": "say \\"hi\\" \\\\n"}\n')
    report = run_policy_tests(policy_set({"t.rego": policy, "t_test.rego": tests}), "data.t.same")
    assert outcomes(report) == {"test_same": ("pass", ""), "test_other": ("pass", "")}


def test_a_request_case_needs_the_envoy_reader() -> None:
    """The policy package reads no protobuf: a run not given the Envoy side's reader reports
    a ``request`` case as an error instead of importing the transport."""
    report = run_policy_tests(policy_set({"policy.rego": POLICY}, cases={"x_test.yaml": CASES}),
                              "data.envoy.authz.allow")
    outcome, detail = outcomes(report)["x_test.yaml#an ext_authz request"]
    assert outcome == "error" and "Envoy side" in detail
