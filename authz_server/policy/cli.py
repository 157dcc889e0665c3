"""``authz-server policy test DIR``: run a policy folder's tests, like ``opa test``.

The tests run in a separate process (the same preflight the server uses before loading a
policy), so a test that crashes the Rego engine is reported as a failure, not a crash.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import PolicyError
from .preflight import preflight
from .source import load_policy_set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    test = sub.add_parser("test", help="run the test_* rules and *_test.yaml cases in DIR; exit 1 on failure")
    test.add_argument("dir", help="policy folder")
    test.add_argument("--query", default="data.envoy.authz.allow", help="query the case files use by default")
    test.add_argument("-v", "--verbose", action="store_true", help="list every test, not only failures")


def run(args: argparse.Namespace) -> int:
    try:
        policy_set = load_policy_set(args.dir)
    except PolicyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    try:
        report = preflight(policy_set, args.query)
    except PolicyError as exc:
        report = getattr(exc, "report", None)
        if report is None:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    results = report.get("tests", {}).get("results", [])
    passed = sum(1 for r in results if r["outcome"] == "pass")
    for result in results:
        if result["outcome"] != "pass" or args.verbose:
            detail = f": {result['detail']}" if result["detail"] else ""
            print(f"{result['location']}: {result['name']}: {result['outcome'].upper()} "
                  f"({result['seconds'] * 1000:.1f}ms){detail}")
    if not results:
        print(f"no tests found in {args.dir} (test_* rules or *_test.yaml case files)")
        return 0
    print("-" * 80)
    failed = len(results) - passed
    print(f"{'PASS' if not failed else 'FAIL'}: {passed}/{len(results)}" + (f" ({failed} failed)" if failed else ""))
    return 0 if not failed else 1
