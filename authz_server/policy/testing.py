"""Run a policy set's own tests, as ``opa test`` does, on the OPA engine.

Two kinds of tests are found in a policy folder:

* Rego rules named ``test_*`` (``todo_test_*`` are skipped), in any ``.rego`` file, run
  natively by OPA with every module loaded (``with input as``, ``with data.x as`` and
  function mocks included). A test passes when it evaluates to ``true``; a parametrized test
  (``test_x[name] := ...``) passes when every one of its values is ``true``. Built-in errors
  follow the server's setting (OPA's default: undefined).
* Case files ``*_test.yaml`` / ``*_test.json``: a list of cases as data, each with an
  ``input`` document (or an ext_authz ``request`` in protobuf JSON, turned into the input
  exactly as the server does) and the expected value of the ``query``. An ``expect``
  object is compared as a subset (only the keys it names); anything else exactly.
  ``expect_undefined: true`` expects no value.

The runner never raises for a bad test: each result says pass, fail or error, and why.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from ..errors import AuthzError, PolicyError
from .engine import UNDEFINED, CompiledPolicy, encode_input, load_engine, validate_query
from .source import PolicySet

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class TestResult:
    name: str  # data.pkg.test_x or file.yaml#case name
    location: str  # file the test lives in
    outcome: str  # "pass", "fail", "error", "skip"
    detail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """Not a failure: passed, or skipped (``todo_test_``) as ``opa test`` counts it."""
        return self.outcome in ("pass", "skip")


@dataclass
class TestReport:
    results: list[TestResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[TestResult]:
        return [r for r in self.results if not r.passed]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "results": [
            {"name": r.name, "location": r.location, "outcome": r.outcome, "detail": r.detail, "seconds": r.seconds}
            for r in self.results
        ]}


# (request, identity, signals) -> the input document: how a case given as an ext_authz
# CheckRequest (protobuf JSON) becomes input. The Envoy side owns that reading
# (``envoy.input_from_request_json``); whoever runs the tests passes it in, so the policy
# package imports nothing of the transports above it.
RequestReader = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]], Any]


def run_policy_tests(policy_set: PolicySet, query: str, *, strict: bool = False,
                     read_request: RequestReader | None = None) -> TestReport:
    report = TestReport()
    report.results.extend(_run_rego_tests(policy_set, query, strict))
    report.results.extend(_run_case_files(policy_set, query, strict, read_request))
    return report


def check_tests(policy_set: PolicySet, query: str, *, strict: bool = False,
                read_request: RequestReader | None = None) -> TestReport:
    """The reload gate: raises ``PolicyError(policy_tests_failed)`` (with ``.report``) on a failure."""
    report = run_policy_tests(policy_set, query, strict=strict, read_request=read_request)
    failures = report.failures
    if failures:
        shown = "; ".join(f"{r.name}: {r.outcome.upper()} {r.detail}".strip() for r in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        error = PolicyError(f"{len(failures)} policy test(s) failed: {shown}{more}", code="policy_tests_failed")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


# -- Rego test rules

@dataclass(frozen=True, slots=True)
class _TestRule:
    location: str
    query: str  # data.pkg.test_x
    partial: bool  # test_x[name] := ...: every value must be true
    skip: bool  # todo_test_*


def _run_rego_tests(policy_set: PolicySet, query: str, strict: bool) -> Iterator[TestResult]:
    try:
        # Every module, tests included, as `opa test` loads them; an error stops the run as there.
        evaluator = CompiledPolicy(policy_set, query, strict, dict(policy_set.modules)).new_evaluator()
        rules = list(_test_rules(policy_set))
    except AuthzError as exc:
        yield TestResult("compile", exc.message.split(":", 1)[0], "error", exc.message)
        return
    try:
        for rule in rules:
            yield _run_rule(evaluator, rule)
    finally:
        evaluator.close()


def _run_rule(evaluator: Any, rule: _TestRule) -> TestResult:
    if rule.skip:
        return TestResult(rule.query, rule.location, "skip", "todo_test_ rule")
    started = time.perf_counter()
    try:
        result = evaluator.query(rule.query, None)
    except AuthzError as exc:
        return TestResult(rule.query, rule.location, "error", exc.message, time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    value = result[0]["expressions"][0]["value"] if result else UNDEFINED
    if rule.partial and isinstance(value, dict) and value:
        failed = sorted(str(k) for k, v in value.items() if v is not True)
        if not failed:
            return TestResult(rule.query, rule.location, "pass", "", elapsed)
        return TestResult(rule.query, rule.location, "fail", f"not true for {', '.join(failed)}", elapsed)
    if value is True:
        return TestResult(rule.query, rule.location, "pass", "", elapsed)
    shown = "undefined" if value is UNDEFINED else json.dumps(value)
    return TestResult(rule.query, rule.location, "fail", f"evaluated to {shown}", elapsed)


def _test_rules(policy_set: PolicySet) -> Iterator[_TestRule]:
    """Every test rule, found by OPA's own parser (``rego.parse_module``), once per rule."""
    seen: set[str] = set()
    parser = load_engine({}, {})
    try:
        for location, source in policy_set.modules.items():
            if "test_" not in source:
                continue
            # Every module compiled already, so it parses.
            module = parser.eval_query("m := rego.parse_module(input.f, input.s)", {"f": location, "s": source})[0]["m"]
            package = _ref_text(module["package"]["path"])
            for rule in module.get("rules") or []:
                found = _test_ref(rule["head"])
                if found is None:
                    continue
                ref, partial = found
                name = package + ref
                if name in seen:
                    continue
                seen.add(name)
                yield _TestRule(location, name, partial, ref.rsplit(".", 1)[-1].startswith("todo_test_"))
    finally:
        parser.close()


def _test_ref(head: dict[str, Any]) -> tuple[str, bool] | None:
    """The ref a test rule is queried by (up to its ``test_`` part, as ``opa test`` does)."""
    parts = head.get("ref") or [{"type": "var", "value": head.get("name", "")}]
    names = []
    for index, part in enumerate(parts):
        if part.get("type") not in ("var", "string"):
            return None
        names.append(str(part["value"]))
        if names[-1].startswith(("test_", "todo_test_")):
            return _ref_text(parts[:index + 1], head=False), index < len(parts) - 1
    return None


def _ref_text(path: list[dict[str, Any]], *, head: bool = True) -> str:
    """``data.a["b-c"].d`` from OPA's JSON ref: identifiers dotted, anything else quoted."""
    text = str(path[0]["value"]) if head else ""
    for part in path[1:] if head else path:
        value = str(part["value"])
        text += f".{value}" if _IDENTIFIER.match(value) else f"[{json.dumps(value)}]"
    return text


# -- case files

def _run_case_files(policy_set: PolicySet, query: str, strict: bool,
                    read_request: RequestReader | None) -> Iterator[TestResult]:
    for location, document in policy_set.test_cases.items():
        file_query = document.get("query", query)
        cases = document.get("cases")
        if not isinstance(cases, list):
            yield TestResult(location, location, "error", "expected a 'cases' list")
            continue
        try:
            # Checked as the server checks its own query: anything else (a typo such as
            # `allow`, or a number) would compile as an expression and fail every case obscurely.
            if not isinstance(file_query, str):
                raise AuthzError(f"'query' must be a string, got {file_query!r}", code="test_case_invalid")
            evaluator = CompiledPolicy.compile(policy_set, validate_query(file_query), strict=strict).new_evaluator()
        except AuthzError as exc:
            yield TestResult(location, location, "error", exc.message)
            continue
        try:
            for index, case in enumerate(cases):
                yield _run_case(evaluator, location, index, case, read_request)
        finally:
            evaluator.close()


def _run_case(evaluator: Any, location: str, index: int, case: Any,
              read_request: RequestReader | None) -> TestResult:
    if not isinstance(case, dict):
        return TestResult(f"{location}#{index}", location, "error", "a case must be an object")
    name = f"{location}#{case.get('name', index)}"
    started = time.perf_counter()
    try:
        value = evaluator.evaluate(encode_input(case_input(case, read_request)))
    except AuthzError as exc:
        return TestResult(name, location, "error", exc.message, time.perf_counter() - started)
    except (TypeError, ValueError) as exc:  # e.g. `request: text` or `identity: [..]`: a bad case, not a crash
        return TestResult(name, location, "error", f"invalid case: {exc}", time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    if case.get("expect_undefined"):
        ok = value is UNDEFINED
        expected = "undefined"
    elif "expect" in case:
        ok = value is not UNDEFINED and _matches(value, case["expect"])
        expected = json.dumps(case["expect"])
    else:
        return TestResult(name, location, "error", "a case needs 'expect' or 'expect_undefined'", elapsed)
    if ok:
        return TestResult(name, location, "pass", "", elapsed)
    shown = "undefined" if value is UNDEFINED else json.dumps(value)
    return TestResult(name, location, "fail", f"expected {expected}, got {shown}", elapsed)


def case_input(case: dict[str, Any], read_request: RequestReader | None = None) -> Any:
    """The input document of a case: given directly, or built from an ext_authz request."""
    if "input" in case:
        return case["input"]
    if "request" in case:
        if read_request is None:
            raise AuthzError("a 'request' case is read by the server's Envoy side, which this run was not given",
                             code="test_case_invalid")
        return read_request(case["request"], case.get("identity", {}), case.get("signals", {}))
    raise AuthzError("a case needs 'input' or 'request'", code="test_case_invalid")


def _matches(value: Any, expected: Any) -> bool:
    if isinstance(expected, dict) and isinstance(value, dict):
        return all(k in value and _matches(value[k], v) for k, v in expected.items())
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    return bool(value == expected)
