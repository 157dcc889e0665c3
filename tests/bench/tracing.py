"""What tracing costs a decision, in process: off (no ``OTEL_*``: the server's default) against
on (spans exported over OTLP/gRPC to a local collector in a process of its own), for cached and
uncached decisions of traffic that does not repeat (a different path, request id and
``traceparent`` on every request; the policy reads the path, so uncached means a policy
evaluation each time).

Measured per decision, rounds interleaved (off, on, off, on...), each mode's best round kept:
  * request-path hooks: what a decision itself runs when tracing is on (a phase clock, three
    timestamps, one queue append), timed alone;
  * on, total: the decision loop with the tracer working as in the server (its thread makes spans
    every 50 ms, the SDK's thread batches and exports them), then until the last span is
    acknowledged by the collector. Those threads share the process and its GIL, so this is all the
    CPU a traced decision costs the server. With ``traceparent`` flags ``00`` (Envoy did not
    sample), the SDK's parent-based sampler drops the span and only reading the context is left.

    python -m tests.bench.tracing [--decisions 4000] [--rounds 3] [--against REF]

``--against REF`` also runs the tracing-off loops of git REF's tree (``git archive``), rounds
interleaved with this tree's: the cost of the hooks themselves when tracing is off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
REPO = HERE.parents[1]
ROUTE_RULE = HERE / "policies" / "route_rule"


def _requests(count: int, sampled: bool = True) -> list[bytes]:
    from authz_server.envoy import check_request_from_json

    out = []
    for i in range(count):
        path = f"/people/{i}"
        out.append(check_request_from_json({"attributes": {
            "source": {"address": {"socketAddress": {"address": "10.1.2.3", "portValue": 40000 + i % 20000}},
                       "principal": "spiffe://example.org/web"},
            "request": {"http": {"id": str(i), "method": "GET", "path": path, "host": "people", "protocol": "HTTP/1.1",
                                 "headers": {":authority": "people", ":method": "GET", ":path": path, "x-role": "guest",
                                             "user-agent": "bench", "x-request-id": secrets.token_hex(8),
                                             "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-"
                                                            f"{'01' if sampled else '00'}"}}},
        }}).SerializeToString())
    return out


async def _loop(pipeline: Any, requests: list[bytes]) -> float:
    from authz_server.envoy import facts_from_check_request, parse_check_request

    now = time.time()
    start = time.perf_counter()
    for raw in requests:
        decision = await pipeline.decide(facts_from_check_request(parse_check_request(raw)), now=now)
    assert decision.allowed, decision.reason
    return time.perf_counter() - start


def _pipeline(runtime: Any, cached: bool, tracer: Any = None) -> Any:
    from authz_server.decision import DecisionSettings, Pipeline

    settings = DecisionSettings(cache_max_entries=100_000 if cached else 0)
    if tracer is None:
        return Pipeline(runtime, settings=settings)  # as the tracing-off server builds it (works on older trees)
    return Pipeline(runtime, settings=settings, observers=[tracer.observe], tracing=tracer)


async def off_only(decisions: int) -> dict[str, float]:
    """µs per decision with tracing off, cached and uncached (also run in an older tree)."""
    from authz_server.policy.loader import PolicyRuntime

    runtime = PolicyRuntime(str(ROUTE_RULE))
    runtime.load()
    requests = _requests(decisions)
    results = {}
    for cached in (True, False):
        pipeline = _pipeline(runtime, cached)
        await _loop(pipeline, requests)  # warm: every request cached (or the evaluators warm)
        results["cached" if cached else "uncached"] = await _loop(pipeline, requests) / decisions * 1e6
    runtime.close()
    return results


class _Collector:
    """``tests.support.otlp`` in a child process (its CPU is not this process's)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.otlp"], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.ports = json.loads(self.proc.stdout.readline())

    def count(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def off_and_on(decisions: int, rounds: int) -> dict[str, Any]:
    from authz_server.policy.loader import PolicyRuntime
    from authz_server.tracing import tracing_from_env

    collector = _Collector()
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.ports['grpc']}",
               "OTEL_BSP_MAX_QUEUE_SIZE": str(max(2048, decisions * 2))}
    os.environ.update(environ)  # the SDK's exporter and processor read os.environ themselves
    tracer = tracing_from_env(environ)
    assert tracer is not None
    runtime = PolicyRuntime(str(ROUTE_RULE))
    runtime.load()
    sampled, unsampled = _requests(decisions), _requests(decisions, sampled=False)
    best: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    exported_before = 0
    try:
        for kind, cached, requests in (("cached", True, sampled), ("uncached", False, sampled),
                                       ("cached_unsampled", True, unsampled)):
            plain, traced = _pipeline(runtime, cached), _pipeline(runtime, cached, tracer)
            await _loop(plain, requests)
            await _loop(traced, requests)  # warm both (and fill both caches)
            assert tracer.flush(120)
            for _ in range(rounds):
                off = await _loop(plain, requests)
                on = await _loop(traced, requests)
                start = time.perf_counter()
                assert tracer.flush(120)  # the spans still queued: made, exported, acknowledged
                total = on + time.perf_counter() - start
                for name, value in ((f"{kind}_off", off), (f"{kind}_on_total", total)):
                    us = value / decisions * 1e6
                    best[name] = min(best.get(name, us), us)
                    spread.setdefault(name, []).append(us)
        deadline = time.monotonic() + 60
        while collector.count() < tracer.traced and time.monotonic() < deadline:
            time.sleep(0.05)
        exported_before = collector.count()
    finally:
        tracer.shutdown()
        runtime.close()
        collector.close()
        for name in environ:
            os.environ.pop(name, None)
    return {"us_per_decision": best, "rounds": spread, "hooks_us": _hooks_us(tracer), "spans_traced": tracer.traced,
            "spans_received_by_collector": exported_before, "spans_dropped": tracer.dropped}


def _hooks_us(tracer: Any) -> float:
    """µs of the request path's tracing work: what ``Pipeline.decide`` and its observer run."""
    from .harness import timed

    decision: Any = object()
    held = tracer.max_queue
    tracer.max_queue = 0  # counted as a drop: the same test and no queue growing under the timer

    def hooks() -> None:
        phases = tracer.start()
        phases.mark("identity")
        phases.mark("cache", True)
        phases.mark("policy")
        tracer.observe(decision, None, 0.0)

    try:
        return timed(hooks, seconds=1.0, min_runs=10_000)
    finally:
        tracer.max_queue = held
        tracer.dropped = 0


def against(ref: str, decisions: int, rounds: int) -> dict[str, Any]:
    """Tracing off: this tree against git ``ref``'s, each in its own process, rounds interleaved."""
    tree = Path(tempfile.mkdtemp(prefix="authz-bench-ref-"))
    try:
        archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        for built in ("authz_server/_proto", *(str(p.relative_to(REPO)) for p in (REPO / "authz_server").glob("*.so"))):
            target = tree / built
            if not target.exists():
                (shutil.copytree if (REPO / built).is_dir() else shutil.copy)(REPO / built, target)
        shutil.copytree(HERE, tree / "tests" / "bench", dirs_exist_ok=True)
        runs: dict[str, list[dict[str, float]]] = {"this_tree": [], ref: []}
        for _ in range(rounds):
            for name, root in (("this_tree", REPO), (ref, tree)):
                done = subprocess.run([sys.executable, "-m", "tests.bench.tracing", "--off-only",
                                       "--decisions", str(decisions)], cwd=root, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(root)}, check=True)
                runs[name].append(json.loads(done.stdout))
        return {name: {kind: min(r[kind] for r in results) for kind in ("cached", "uncached")}
                for name, results in runs.items()}
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def run(smoke: bool = False) -> tuple[dict[str, Any], str]:
    decisions, rounds = (300, 1) if smoke else (4000, 3)
    results = asyncio.run(off_and_on(decisions, rounds))
    return results, report(results, decisions)


def report(results: dict[str, Any], decisions: int) -> str:
    from .harness import table

    best = results["us_per_decision"]
    rows = []
    for kind in ("cached", "uncached", "cached_unsampled"):
        off, total = best[f"{kind}_off"], best[f"{kind}_on_total"]
        spread = results["rounds"][f"{kind}_off"]
        rows.append([kind.replace("_", ", ") + (" (traceparent flags 00)" if "unsampled" in kind else ""),
                     f"{off:.1f}", f"{total:.1f}", f"{total - off:+.1f}",
                     f"{(max(spread) - min(spread)) / min(spread) * 100:.0f} %"])
    title = (f"Tracing: µs per decision in process, off vs on (OTLP/gRPC to a local collector), {decisions} "
             f"requests that never repeat, best of the interleaved rounds")
    text = table(title, ["decision", "off", "on, all of it", "Δ", "off round-to-round spread"], rows)
    text += f"\nrequest-path hooks when on (phase clock, 3 marks, queue append): {results['hooks_us']:.2f} µs"
    return text + (f"\nspans made {results['spans_traced']}, received by the collector "
                   f"{results['spans_received_by_collector']}, dropped {results['spans_dropped']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tracing")
    parser.add_argument("--decisions", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--off-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--against", metavar="REF", help="also compare tracing off with git REF's tree")
    args = parser.parse_args()
    if args.off_only:
        print(json.dumps(asyncio.run(off_only(args.decisions))))
        sys.exit(0)
    measured = asyncio.run(off_and_on(args.decisions, args.rounds))
    print(report(measured, args.decisions))
    if args.against:
        compared = against(args.against, args.decisions, args.rounds)
        print(json.dumps(compared, indent=1))
    sys.exit(0)
