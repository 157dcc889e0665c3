"""Run a policy set's own tests, as ``opa test`` does, on regopy.

Two kinds of tests are found in a policy folder:

* Rego rules named ``test_*`` (``todo_test_*`` are skipped), in any ``.rego`` file. A test
  passes when it evaluates to ``true``. regopy 1.5.2 aborts the whole process when it
  compiles ``E with input as X`` where ``E`` reaches a built-in, so this runner does not
  hand it that: in each test rule, the ``with input as X`` clauses (all naming the same
  ``X``) are lifted out; ``X`` is evaluated on its own and given to the engine with
  ``set_input``, then the rule is queried. That is what the clause means, and the common
  OPA test idiom runs unchanged. Other ``with`` targets are passed to the engine as they
  are.
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
from typing import Any, Iterator

import regopy

from ..errors import AuthzError
from .engine import UNDEFINED, engine_input, format_rego_error, load_interpreter
from .source import PolicySet

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.M)
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.M)
_WITH_INPUT = re.compile(r"\bwith\s+input\s+as\s+")


@dataclass(frozen=True, slots=True)
class TestResult:
    name: str  # data.pkg.test_x or file.yaml#case name
    location: str  # file the test lives in
    outcome: str  # "pass", "fail", "error"
    detail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"


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


def run_policy_tests(policy_set: PolicySet, query: str) -> TestReport:
    report = TestReport()
    report.results.extend(_run_rego_tests(policy_set))
    report.results.extend(_run_case_files(policy_set, query))
    return report


# -- Rego test rules

@dataclass
class _RewrittenModule:
    package: str
    source: str
    tests: list[tuple[str, bool]]  # (rule name, takes a lifted input)
    problems: dict[str, str]


def _run_rego_tests(policy_set: PolicySet) -> Iterator[TestResult]:
    rewritten = {name: _rewrite(src) for name, src in policy_set.modules.items() if _TEST_RULE.search(src)}
    base = {name: src for name, src in policy_set.modules.items() if name not in rewritten}
    for location, module in rewritten.items():
        # One interpreter per test module: a module the engine rejects fails its own tests only.
        try:
            interpreter = load_interpreter({**base, location: module.source}, policy_set.data)
        except regopy.RegoError as exc:
            yield TestResult(location, location, "error",
                             format_rego_error(str(exc), {**base, location: module.source}))
            continue
        for rule, lifted in module.tests:
            yield _run_rule(interpreter, module, location, rule, lifted)


def _run_rule(interpreter: regopy.Interpreter, module: "_RewrittenModule", location: str,
              rule: str, lifted: bool) -> TestResult:
    name = f"data.{module.package}.{rule}"
    if rule in module.problems:
        return TestResult(name, location, "error", module.problems[rule])
    started = time.perf_counter()
    try:
        document: Any = {}
        if lifted:
            document = _query(interpreter, f"data.{module.package}.__authz_input_{rule}", {})
            if document is UNDEFINED:
                raise AuthzError("the value after 'with input as' is undefined", code="test_input_undefined")
        value = _query(interpreter, name, document)
    except AuthzError as exc:
        return TestResult(name, location, "error", exc.message, time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    if value is True:
        return TestResult(name, location, "pass", "", elapsed)
    shown = "undefined" if value is UNDEFINED else json.dumps(value)
    return TestResult(name, location, "fail", f"evaluated to {shown}", elapsed)


def _query(interpreter: regopy.Interpreter, ref: str, document: Any) -> Any:
    try:
        interpreter.set_input(engine_input(document))
        output = interpreter.query(f"result := {ref}")
    except (ValueError, TypeError) as exc:  # a document the engine cannot take, or output it cannot read
        raise AuthzError(f"cannot evaluate: {exc}", code="policy_eval_error") from None
    except regopy.RegoError as exc:
        raise AuthzError(format_rego_error(str(exc)), code="policy_eval_error") from None
    if not output.ok():
        node = output.node()
        text = "\n".join(node.at(i).json() for i in range(len(node)))
        raise AuthzError(format_rego_error(text), code="policy_eval_error")
    for result in output.results:
        if "result" in result.bindings:
            return result.bindings["result"]
    return UNDEFINED


def _rewrite(source: str) -> _RewrittenModule:
    """Lift ``with input as X`` out of each ``test_*`` rule (see the module docstring)."""
    package_match = _PACKAGE.search(source)
    package = package_match.group(1) if package_match else ""
    tests: list[tuple[str, bool]] = []
    problems: dict[str, str] = {}
    seen: dict[str, int] = {}
    out: list[str] = []
    extra: list[str] = []
    pos = 0
    for match in _TEST_RULE.finditer(source):
        if match.start() < pos:
            continue
        rule = match.group(1)
        end = _rule_end(source, match.end())
        text = source[match.start():end]
        count = seen.get(rule, 0)
        seen[rule] = count + 1
        if count:
            problems[rule] = "test rule defined more than once; give each test its own name"
        stripped, inputs = _strip_with_input(text)
        distinct = list(dict.fromkeys(i.strip() for i in inputs))
        if len(distinct) > 1:
            problems[rule] = "one test uses several 'with input as' values; split it into one test per input"
        if not count:
            tests.append((rule, bool(distinct)))
        if rule in problems:
            # Left out of the module: its `with input as` clauses would still be compiled (and
            # regopy aborts on some), and a second lifted input would conflict with the first;
            # either would take the module's other tests down with it. It reports its problem.
            text = ""
        elif len(distinct) == 1:
            extra.append(f"\n__authz_input_{rule} := {distinct[0]}\n")
            text = stripped
        out.append(source[pos:match.start()])
        out.append(text)
        pos = end
    out.append(source[pos:])
    return _RewrittenModule(package, "".join(out) + "".join(extra), tests, problems)


def _scan(source: str, start: int) -> Iterator[tuple[int, str, int]]:
    """Yield ``(index, char, depth)`` outside strings and comments."""
    depth = 0
    i = start
    n = len(source)
    while i < n:
        c = source[i]
        if c == "#":
            while i < n and source[i] != "\n":
                i += 1
            continue
        if c == '"':
            i += 1
            while i < n and source[i] != '"':
                i += 2 if source[i] == "\\" else 1
            i += 1
            continue
        if c == "`":
            close = source.find("`", i + 1)
            i = n if close < 0 else close + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        yield i, c, depth
        i += 1


def _rule_end(source: str, start: int) -> int:
    """End of a rule definition: its body's closing brace, or the end of a one-line rule."""
    opened = False
    for i, c, depth in _scan(source, start):
        if c == "{" and depth == 1:
            opened = True
        elif c == "}" and depth == 0 and opened:
            j = i + 1
            rest = source[j:].lstrip(" \t")
            if rest.startswith(("else", "{")):
                opened = False
                continue
            return j
        elif c == "\n" and depth == 0 and not opened:
            nxt = source[i + 1:].lstrip(" \t")
            if not nxt.startswith(("{", "else")):
                return i
    return len(source)


def _strip_with_input(text: str) -> tuple[str, list[str]]:
    """Remove each ``with input as X`` clause; return the new text and the ``X`` terms."""
    inputs: list[str] = []
    result = text
    while True:
        match = None
        for m in _WITH_INPUT.finditer(result):
            if _outside_strings(result, m.start()):
                match = m
                break
        if match is None:
            return result, inputs
        term_end = _term_end(result, match.end())
        inputs.append(result[match.end():term_end])
        result = result[:match.start()].rstrip(" \t") + result[term_end:]


def _outside_strings(text: str, index: int) -> bool:
    return any(i == index for i, _c, _d in _scan(text, 0))


def _term_end(text: str, start: int) -> int:
    base = None
    for i, c, depth in _scan(text, start):
        if base is None:
            base = depth - (1 if c in "([{" else 0)
        if depth < base or (depth == base and c in "\n;"):
            return i
        if depth == base and text.startswith(" with ", i):
            return i
    return len(text)


# -- case files

def _run_case_files(policy_set: PolicySet, query: str) -> Iterator[TestResult]:
    if not policy_set.test_cases:
        return
    from .engine import CompiledPolicy, validate_query  # the serving path: same bundle, same query binding

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
            evaluator = CompiledPolicy(policy_set, validate_query(file_query)).new_evaluator()
        except AuthzError as exc:
            yield TestResult(location, location, "error", exc.message)
            continue
        for index, case in enumerate(cases):
            yield _run_case(evaluator, location, index, case)


def _run_case(evaluator: Any, location: str, index: int, case: Any) -> TestResult:
    if not isinstance(case, dict):
        return TestResult(f"{location}#{index}", location, "error", "a case must be an object")
    name = f"{location}#{case.get('name', index)}"
    started = time.perf_counter()
    try:
        document = case_input(case)
        value = evaluator.evaluate(document)
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


def case_input(case: dict[str, Any]) -> Any:
    """The input document of a case: given directly, or built from an ext_authz request."""
    if "input" in case:
        return case["input"]
    if "request" in case:
        from ..envoy import check_request_from_json, facts_from_check_request
        from ..facts import build_input

        facts = facts_from_check_request(check_request_from_json(case["request"]))
        return build_input(facts, case.get("identity", {}), case.get("signals", {}))
    raise AuthzError("a case needs 'input' or 'request'", code="test_case_invalid")


def _matches(value: Any, expected: Any) -> bool:
    if isinstance(expected, dict) and isinstance(value, dict):
        return all(k in value and _matches(value[k], v) for k, v in expected.items())
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    return value == expected
