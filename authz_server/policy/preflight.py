"""Compile and test a policy set in a throw-away process before the server trusts it.

The Rego engine is native code: some inputs make it abort the process (regopy 1.5.2 does
on ``with input as`` over a built-in). A policy set is therefore first compiled and tested
here, in a child process fed the exact file contents over stdin; only a set that passes is
loaded into the server. A crash or a hang rejects the set and the last good one keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

from ..errors import AuthzError, PolicyError
from .source import CacheSettings, PolicySet

PREFLIGHT_TIMEOUT = 60.0


def _encode(policy_set: PolicySet, query: str, run_tests: bool) -> bytes:
    return json.dumps({
        "modules": dict(policy_set.modules), "data": policy_set.data, "test_cases": dict(policy_set.test_cases),
        "root": policy_set.root, "version": policy_set.version, "query": query, "run_tests": run_tests,
    }).encode()


def _interpret(returncode: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        tail = stderr.decode(errors="replace").strip().splitlines()[-2:]
        raise PolicyError(f"the Rego engine crashed ({name}) on this policy set: {' '.join(tail)}",
                          code="policy_engine_crash")
    try:
        report = json.loads(stdout)
    except ValueError:
        raise PolicyError(f"policy check failed: {stderr.decode(errors='replace').strip()[-500:]}",
                          code="policy_engine_crash") from None
    return report


def preflight(policy_set: PolicySet, query: str, *, run_tests: bool = True,
              timeout: float = PREFLIGHT_TIMEOUT) -> dict[str, Any]:
    """Blocking form (start-up, CLI). Returns the report; raises ``PolicyError`` if it is not ok."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__], input=_encode(policy_set, query, run_tests),
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PolicyError(f"policy compile and tests took longer than {timeout:.0f}s", code="policy_timeout") from None
    return _check(_interpret(done.returncode, done.stdout, done.stderr))


async def preflight_async(policy_set: PolicySet, query: str, *, run_tests: bool = True,
                          timeout: float = PREFLIGHT_TIMEOUT) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", __name__, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(_encode(policy_set, query, run_tests)), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PolicyError(f"policy compile and tests took longer than {timeout:.0f}s", code="policy_timeout") from None
    assert proc.returncode is not None
    return _check(_interpret(proc.returncode, stdout, stderr))


def _check(report: dict[str, Any]) -> dict[str, Any]:
    if report.get("error"):
        raise PolicyError(report["error"]["message"], code=report["error"]["code"])
    failures = [r for r in report.get("tests", {}).get("results", []) if r["outcome"] != "pass"]
    if failures:
        shown = "; ".join(f"{r['name']}: {r['outcome'].upper()} {r['detail']}".strip() for r in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        error = PolicyError(f"{len(failures)} policy test(s) failed: {shown}{more}", code="policy_tests_failed")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def _main() -> int:
    from .engine import CompiledPolicy
    from .testing import run_policy_tests

    request = json.loads(sys.stdin.buffer.read())
    policy_set = PolicySet(
        modules=request["modules"], data=request["data"], test_cases=request["test_cases"],
        cache=CacheSettings(), version=request["version"], root=request["root"],
    )
    report: dict[str, Any] = {"version": policy_set.version}
    try:
        CompiledPolicy.compile(policy_set, request["query"])
        if request["run_tests"]:
            report["tests"] = run_policy_tests(policy_set, request["query"]).to_json()
    except AuthzError as exc:
        report["error"] = {"code": exc.code, "message": exc.message}
    sys.stdout.write(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
