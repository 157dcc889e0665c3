"""OPA's own evaluation test cases, run through authz-server's engine seam.

The corpus is OPA's ``v1/test/cases/testdata/v1`` (see tests/vectors/README.md); each case is
read as OPA's runner reads it (``v1/topdown/exported_test.go``): the modules as
``test-N.rego``, ``data``, ``input`` or a Rego ``input_term``, the query, strict built-in
errors only where ``strict_error`` says so, and the expected bindings, error code or error
text. The only thing translated is ``input_term``, which may hold sets that JSON cannot
carry: it becomes a rule in an extra module and every expression of the query gets
``with input as`` that rule.

    python -m tests.support.conformance        # the pass rate and every miss
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from authz_server.errors import AuthzError
from authz_server.policy.engine import CompiledPolicy, Evaluator, encode_input
from authz_server.policy.source import CacheSettings, PolicySet

CORPUS = Path(__file__).resolve().parents[1] / "vectors" / "opa_conformance" / "v1.tar.gz"


@dataclass(frozen=True)
class Outcome:
    note: str
    passed: bool
    detail: str = ""


def cases() -> Iterator[dict[str, Any]]:
    with tarfile.open(CORPUS) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if not member.isfile() or not member.name.endswith(".yaml"):
                continue
            handle = archive.extractfile(member)
            assert handle is not None
            document = yaml.safe_load(io.TextIOWrapper(handle, encoding="utf-8"))
            yield from document.get("cases") or []


def run_case(case: dict[str, Any]) -> Outcome:
    note = case["note"]
    modules = {f"test-{i}.rego": source for i, source in enumerate(case.get("modules") or [])}
    query = case["query"]
    if case.get("input_term") is not None:
        query = f"__input_term := {case['input_term']}; " + _with_input(query, "__input_term")
    policy_set = PolicySet(modules=modules, data=case.get("data") or {}, test_cases={}, cache=CacheSettings(),
                           version=note)
    try:
        evaluator = Evaluator(CompiledPolicy(policy_set, "data", bool(case.get("strict_error")), modules))
    except AuthzError as exc:
        return _expect_error(case, exc.message)
    try:
        input_json = encode_input(case["input"]) if "input" in case and case.get("input_term") is None else None
        result = evaluator.query(query, input_json)
    except AuthzError as exc:
        return _expect_error(case, exc.message)
    finally:
        evaluator.close()
    if "want_error" in case or "want_error_code" in case:
        return Outcome(note, False, f"expected an error, got {json.dumps(result)[:200]}")
    if case.get("want_result") is None:
        return Outcome(note, False, "the case expects nothing this runner knows")
    got = _bindings(result, case)
    want = {_canonical(row, case) for row in case["want_result"] or []}
    return Outcome(note, got == want, "" if got == want else f"want {sorted(want)[:3]}, got {sorted(got)[:3]}")


def _expect_error(case: dict[str, Any], message: str) -> Outcome:
    note = case["note"]
    if "want_error" in case:
        ok = case["want_error"] in message
        return Outcome(note, ok, "" if ok else f"error text {message[:200]!r} lacks {case['want_error']!r}")
    if "want_error_code" in case:
        ok = case["want_error_code"] in message
        return Outcome(note, ok, "" if ok else f"error {message[:200]!r} is not {case['want_error_code']}")
    return Outcome(note, False, f"unexpected error: {message[:300]}")


def _bindings(result: list[dict[str, Any]], case: dict[str, Any]) -> set[str]:
    return {_canonical(row.get("bindings") or {}, case) for row in result}


def _canonical(bindings: dict[str, Any], case: dict[str, Any]) -> str:
    bindings = {k: v for k, v in bindings.items() if k != "__input_term"}
    if case.get("ignore_generated_vars"):
        bindings = {k: v for k, v in bindings.items() if not k.startswith("__localq")}
    if case.get("sort_bindings"):
        bindings = {k: sorted(v, key=lambda x: json.dumps(x, sort_keys=True)) if isinstance(v, list) else v
                    for k, v in bindings.items()}
    return json.dumps(_numbers(bindings), sort_keys=True)


def _numbers(value: Any) -> Any:
    """1 and 1.0 are one number in Rego."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _with_input(query: str, ref: str) -> str:
    """``with input as ref`` after every expression of the query body."""
    expressions, depth, current, quote = [], 0, [], ""
    for char in query:
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
            continue
        if char in "\"`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char in ";\n" and depth == 0:
            expressions.append("".join(current))
            current = []
            continue
        current.append(char)
    expressions.append("".join(current))
    return "; ".join(f"{e.strip()} with input as {ref}" for e in expressions if e.strip())


def run_all() -> list[Outcome]:
    return [run_case(case) for case in cases()]


def main() -> int:
    outcomes = run_all()
    passed = sum(o.passed for o in outcomes)
    print(f"OPA conformance corpus through authz-server's engine seam: {passed}/{len(outcomes)} "
          f"({passed / len(outcomes):.1%})")
    for outcome in outcomes:
        if not outcome.passed:
            detail = re.sub(r"\s+", " ", outcome.detail)[:240]
            print(f"  miss: {outcome.note}: {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
