"""``authz-server policy test DIR`` and ``authz-server policy eval QUERY``, like ``opa test``
and ``opa eval``, on the engine the server uses.

``policy eval`` prints what ``opa eval`` prints for ``--format json`` (the result set, ``{}``
when it is empty) and ``pretty``; it exits 0 whether the result is defined or not (``--fail``
and ``--fail-defined`` as in ``opa eval``), and 1 with one line on a compile or evaluation error.
``--explain notes|fails|full|debug`` adds OPA's explanation (``policy.explain``): the trace lines
``opa eval --explain`` prints, then a summary of the rules evaluated and why the result came out;
with ``--format json`` the events as ``explanation`` and the summary as ``summary``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from ..envoy import input_from_request_json
from ..errors import AuthzError, PolicyError
from .engine import CompiledPolicy, Evaluator, Traced, encode_input
from .explain import MODES, Explanation, explain
from .source import PolicySet, load_documents, load_policy_set
from .testing import run_policy_tests

FORMATS = ("json", "pretty", "values", "bindings", "raw")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    test = sub.add_parser("test", help="run the test_* rules and *_test.yaml cases in DIR; exit 1 on failure")
    test.add_argument("dir", help="policy folder")
    test.add_argument("--query", default="data.envoy.authz.allow", help="query the case files use by default")
    test.add_argument("--strict-builtin-errors", action="store_true", help="a failing built-in is an error")
    test.add_argument("-v", "--verbose", action="store_true", help="list every test, not only failures")

    evaluate = sub.add_parser("eval", help="evaluate a Rego query, as opa eval does")
    evaluate.add_argument("query", help="the Rego query, e.g. data.envoy.authz.allow")
    evaluate.add_argument("-d", "--data", action="append", default=[], metavar="PATH",
                          help=".rego or data.json/data.yaml files, or folders in bundle layout (repeatable)")
    evaluate.add_argument("-i", "--input", metavar="FILE", help="input document (JSON or YAML)")
    evaluate.add_argument("-I", "--stdin-input", action="store_true", help="read the input document from stdin")
    evaluate.add_argument("-f", "--format", choices=FORMATS, default="json", help="output format (default json)")
    evaluate.add_argument("--strict-builtin-errors", action="store_true", help="a failing built-in is an error")
    evaluate.add_argument("--explain", choices=("off", *MODES), default="off",
                          help="explain the result as opa eval does: notes (trace() calls), fails (where rules "
                               "stopped), full (every step but unifications), debug (everything)")
    outcome = evaluate.add_mutually_exclusive_group()
    outcome.add_argument("--fail", action="store_true", help="exit 1 when the result is undefined or empty")
    outcome.add_argument("--fail-defined", action="store_true", help="exit 1 when the result is defined")


def run(args: argparse.Namespace) -> int:
    if args.policy_command == "eval":
        return run_eval(args)
    return run_test(args)


# -- policy test

def run_test(args: argparse.Namespace) -> int:
    try:
        policy_set = load_policy_set(args.dir)
    except PolicyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    results = run_policy_tests(policy_set, args.query, strict=args.strict_builtin_errors,
                               read_request=input_from_request_json).results
    if results and results[0].name == "compile":  # nothing ran: the set itself is broken
        print(f"error: {results[0].detail}", file=sys.stderr)
        return 1
    for result in results:
        if result.outcome != "pass" or args.verbose:
            detail = f": {result.detail}" if result.detail else ""
            print(f"{result.location}: {result.name}: {result.outcome.upper()} "
                  f"({result.seconds * 1000:.1f}ms){detail}")
    if not results:
        print(f"no tests found in {args.dir} (test_* rules or *_test.yaml case files)")
        return 0
    print("-" * 80)
    passed = sum(1 for r in results if r.outcome == "pass")
    skipped = sum(1 for r in results if r.outcome == "skip")
    failed = len(results) - passed - skipped
    counts = ", ".join(part for part in (f"{failed} failed" if failed else "", f"{skipped} skipped" if skipped else "")
                       if part)
    print(f"{'PASS' if not failed else 'FAIL'}: {passed}/{len(results)}" + (f" ({counts})" if counts else ""))
    return 0 if not failed else 1


# -- policy eval

def run_eval(args: argparse.Namespace) -> int:
    try:
        modules, data = load_documents(args.data)
        document = _read_input(args)
        policy_set = PolicySet(modules=modules, data=data, test_cases={}, cache=None, version="")  # type: ignore[arg-type]
        evaluator = Evaluator(CompiledPolicy(policy_set, "data", args.strict_builtin_errors, modules),
                              on_print=_print_to_stderr)
        input_json = None if document is _NO_INPUT else encode_input(document)
        try:
            if args.explain == "off":
                result, explanation = evaluator.query(args.query, input_json), None
            else:
                traced: Traced = evaluator.query_traced(args.query, input_json)
                result = traced.result
                explanation = explain(traced.events, args.explain, defined=bool(result), modules=modules)
        finally:
            evaluator.close()
    except AuthzError as exc:
        print(f"authz-server: policy eval: {exc.message}", file=sys.stderr)
        return 1
    if explanation is None:
        _show(result, args.format)
    elif args.format == "json":
        document = {"result": result} if result else {}
        print(go_json({**document, "explanation": list(explanation.events), "summary": explanation.summary}))
    else:
        # pretty: explanation, then the result (as opa eval); other formats keep stdout for values
        print(_explanation_text(explanation), file=sys.stdout if args.format == "pretty" else sys.stderr)
        _show(result, args.format)
    defined = bool(result)
    return 1 if (args.fail and not defined) or (args.fail_defined and defined) else 0


_NO_INPUT: Any = object()


def _read_input(args: argparse.Namespace) -> Any:
    if args.input and args.stdin_input:
        raise PolicyError("give --input or --stdin-input, not both", code="policy_input_invalid")
    if args.stdin_input:
        text, name = sys.stdin.read(), "stdin"
    elif args.input:
        try:
            text, name = Path(args.input).read_text(encoding="utf-8"), args.input
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read input {args.input}: {getattr(exc, 'strerror', None) or exc}",
                              code="policy_input_invalid") from None
    else:
        return _NO_INPUT
    try:
        return json.loads(text) if not name.endswith((".yaml", ".yml")) else yaml.safe_load(text)
    except ValueError:
        try:
            return yaml.safe_load(text)  # opa eval takes YAML input too
        except yaml.YAMLError as exc:
            raise PolicyError(f"input {name} is neither JSON nor YAML: {str(exc).splitlines()[0]}",
                              code="policy_input_invalid") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"input {name} is not YAML: {str(exc).splitlines()[0]}", code="policy_input_invalid") from None


def _explanation_text(explanation: Explanation) -> str:
    summary = explanation.summary
    lines = [*explanation.lines, "", f"Why: {summary['because']}"]
    rules = summary["rules"]
    if rules:
        lines.append("Rules evaluated:")
        width = max(len(f"{rule['rule']} ({rule['location']})") for rule in rules)
        for rule in rules:
            name = f"{rule['rule']} ({rule['location']})".ljust(width)
            line = f"  {name}  entered {rule['entered']}, succeeded {rule['succeeded']}"
            if rule.get("default"):
                line += " (default)"
            for stop in rule.get("failed_at", ()):
                line += f"; stopped at {stop['location']}: {stop.get('source') or stop['expression']}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _print_to_stderr(message: str, location: str) -> None:
    print(f"{location}: {message}", file=sys.stderr)


def go_json(value: Any) -> str:
    """JSON as OPA's encoder writes it: two-space indent, HTML characters escaped."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: f"\\u{ord(m.group(0)):04x}", text)


def _show(result: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(go_json({"result": result} if result else {}))
    elif fmt == "values":
        for row in result:
            print(go_json([e["value"] for e in row["expressions"]]))
    elif fmt == "bindings":
        for row in result:
            print(go_json(row.get("bindings") or {}))
    elif fmt == "raw":
        for row in result:
            for expression in row["expressions"]:
                value = expression["value"]
                print(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    else:
        _pretty(result)


def _pretty(result: list[dict[str, Any]]) -> None:
    """``opa eval --format pretty``: one value alone, else a table of bindings and expressions."""
    if not result:
        print("undefined")
        return
    first = result[0]
    expressions = first["expressions"]
    if len(result) == 1 and not first.get("bindings") and (
            len(expressions) == 1 or all(isinstance(e["value"], bool) for e in expressions)):
        print(go_json(expressions[0]["value"]))
        return
    keys: list[tuple[str, Any]] = [(name, ("binding", name)) for name in (first.get("bindings") or {})]
    for index, expression in enumerate(expressions):
        if not isinstance(expression["value"], bool) or not first.get("bindings"):
            keys.append((expression["text"], ("expression", index)))
    keys.sort(key=lambda k: (k[1][0] != "binding", k[0] if k[1][0] == "binding" else "", k[1][1]))
    rows = [[json.dumps(row["bindings"][which] if kind == "binding" else row["expressions"][which]["value"],
                        separators=(",", ":"), ensure_ascii=False)
             for _, (kind, which) in keys] for row in result]
    widths = [max(len(name), *(len(r[i]) for r in rows)) for i, (name, _) in enumerate(keys)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print(rule)
    print("|" + "|".join(f" {name.center(w)} " for (name, _), w in zip(keys, widths)) + "|")
    print(rule)
    for row in rows:
        print("|" + "|".join(f" {cell.ljust(w)} " for cell, w in zip(row, widths)) + "|")
    print(rule)
