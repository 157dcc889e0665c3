"""What tracing costs a decision, in process: off (no ``OTEL_*``: the server's default) against
on (spans exported over OTLP/gRPC to a local collector in a process of its own), for cached and
uncached decisions of traffic that does not repeat (a different path, request id and
``traceparent`` on every request; the policy reads the path, so uncached means a policy
evaluation each time). "On" is the server's path for OTLP (``tracing.otlp``: spans encoded
straight into OTLP requests); "SDK spans" is the path other exporters take (``tracing.sdkspans``:
an SDK span per decision, the SDK's batch processor and encoder), on the same collector.

Measured per decision in many short rounds, interleaved (off, on, SDK spans; then SDK spans, on,
off; ...): each Δ is the median of the rounds' own differences, with a 95 % confidence interval
(``median_interval``), since other processes on a shared machine move whole rounds by more than
the difference judged, and short alternating rounds let those moves cancel:
  * CPU: ``time.process_time`` of the whole process (every thread: the decision loop, the tracer's
    thread, the SDK's and gRPC's threads) from the loop's start until the collector acknowledged
    the last span: all the CPU a traced decision costs the server, and what the ≤ 10 µs target is
    about. Other processes on the machine blur it less than the wall clock;
  * of which the loop's thread: ``time.thread_time`` of the thread deciding (the request path's
    hooks, run there, after a policy evaluation whose engine has left the CPU's caches cold); the
    rest of the difference is the tracer's thread (shown per span) and the other threads';
  * wall: the same span of time on the wall clock;
  * request-path hooks: what a decision itself runs when tracing is on (a phase clock, three
    timestamps, what the span needs kept, one queue append; for a decision the cache answered,
    the span itself made there), timed alone.
The decisions run on uvloop, the event loop ``serve`` runs. With ``traceparent`` flags ``00``
(Envoy did not sample), the parent-based sampler drops the span as the decision starts.

    python -m tests.bench.tracing [--decisions 1024] [--rounds 24] [--against REF]

``--against REF`` also runs the tracing-off loops of git REF's tree (``git archive``), rounds
interleaved with this tree's: the cost of the hooks themselves when tracing is off.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import uvloop

from .harness import median_interval

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
    return (await _timed_loop(pipeline, requests))[0]


async def _timed_loop(pipeline: Any, requests: list[bytes]) -> tuple[float, float, float]:
    """(wall, CPU of the process, CPU of the event loop's thread) seconds of deciding ``requests``."""
    from authz_server.envoy import facts_from_check_request, parse_check_request
    from authz_server.serve import settle_heap

    settle_heap()  # the server's collector (and what earlier loops left is not this loop's to collect)
    now = time.time()
    start, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    for raw in requests:
        decision = await pipeline.decide(facts_from_check_request(parse_check_request(raw)), now=now)
    assert decision.allowed, decision.reason
    return time.perf_counter() - start, time.process_time() - cpu, time.thread_time() - loop_cpu


def _pipeline(runtime: Any, cached: bool, tracer: Any = None) -> Any:
    from authz_server.decision import DecisionSettings, Pipeline

    # cached: every round answered from the cache (its entries outlive the run's rounds)
    settings = DecisionSettings(cache_max_entries=100_000 if cached else 0, cache_ttl=3600.0)
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
    from authz_server.envoy import facts_from_check_request, parse_check_request
    from authz_server.policy.loader import PolicyRuntime
    from authz_server.tracing import tracing_from_env

    collector = _Collector()
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.ports['grpc']}",
               "OTEL_BSP_MAX_QUEUE_SIZE": str(max(2048, decisions * 2))}
    os.environ.update(environ)  # the SDK's exporter and processor read os.environ themselves
    tracers = {"on": tracing_from_env(environ), "sdk": tracing_from_env(environ, sdk_spans=True)}
    runtime = PolicyRuntime(str(ROUTE_RULE))
    runtime.load()
    sampled, unsampled = _requests(decisions), _requests(decisions, sampled=False)
    rounds_us: dict[str, list[float]] = {}
    thread_cpu: dict[str, list[float]] = {}  # the tracer thread's own CPU per span, per round
    try:
        for kind, cached, requests in (("cached", True, sampled), ("uncached", False, sampled),
                                       ("cached_unsampled", True, unsampled)):
            pipelines = {"off": _pipeline(runtime, cached),
                         **{mode: _pipeline(runtime, cached, tracer) for mode, tracer in tracers.items()}}
            for pipeline in pipelines.values():
                await _loop(pipeline, requests)  # warm all (and fill every cache)
            for tracer in tracers.values():
                assert tracer is not None and tracer.flush(120)
            modes = list(pipelines.items())
            for index in range(rounds):
                # off, on, SDK; then SDK, on, off: off runs first in half the rounds and last in the
                # other half, so a machine slowing down or speeding up adds to neither side of a difference
                for mode, pipeline in modes if index % 2 == 0 else modes[::-1]:
                    wall, cpu, loop_cpu = await _timed_loop(pipeline, requests)
                    tracer = tracers.get(mode)
                    if tracer is not None:  # the spans still queued: made, exported, acknowledged
                        start, start_cpu = time.perf_counter(), time.process_time()
                        assert tracer.flush(120)
                        wall += time.perf_counter() - start
                        cpu += time.process_time() - start_cpu
                        if mode == "on" and kind != "cached_unsampled":
                            thread_cpu.setdefault(kind, []).append(tracer.cpu_seconds)
                    rounds_us.setdefault(f"{kind}_{mode}_wall", []).append(wall / decisions * 1e6)
                    rounds_us.setdefault(f"{kind}_{mode}_cpu", []).append(cpu / decisions * 1e6)
                    rounds_us.setdefault(f"{kind}_{mode}_loop", []).append(loop_cpu / decisions * 1e6)
        hooks_us = {}
        for name, request, cached in (("sampled", sampled[0], False), ("sampled and cached", sampled[0], True),
                                      ("not sampled", unsampled[0], False)):
            pipeline = _pipeline(runtime, cached, tracers["on"])
            facts = facts_from_check_request(parse_check_request(request))
            decision = await pipeline.decide(facts, now=time.time())
            if cached:  # the same request again: the cache answers (the span is then made on the request path)
                decision = await pipeline.decide(facts_from_check_request(parse_check_request(request)),
                                                 now=time.time())
                assert decision.cached
            hooks_us[name] = _hooks_us(tracers["on"], decision, facts)
        for tracer in tracers.values():
            assert tracer is not None and tracer.flush(120)
        traced = sum(tracer.traced for tracer in tracers.values() if tracer is not None)
        deadline = time.monotonic() + 60
        while collector.count() < traced and time.monotonic() < deadline:
            time.sleep(0.05)
        received = collector.count()
    finally:
        for tracer in tracers.values():
            if tracer is not None:
                tracer.shutdown()
        runtime.close()
        collector.close()
        for name in environ:
            os.environ.pop(name, None)
    per_span = {kind: statistics.median(after - before for before, after in zip(values, values[1:])) / decisions * 1e6
                for kind, values in thread_cpu.items() if len(values) > 1}
    return {"us_per_decision": {name: statistics.median(values) for name, values in rounds_us.items()},
            "tracer_thread_us_per_span": per_span,
            "rounds": rounds_us, "hooks_us": hooks_us, "spans_traced": traced,
            "spans_received_by_collector": received,
            "spans_dropped": sum(tracer.dropped for tracer in tracers.values() if tracer is not None),
            "load_average": os.getloadavg()}


def _hooks_us(tracer: Any, decision: Any, facts: Any) -> float:
    """CPU µs of the request path's tracing work: what ``Pipeline.decide`` and its observer run
    (the best of a few repeats: this thread's CPU, whatever else the machine runs); for a request
    the sampler drops, the sampler's answer and a count."""
    held = tracer.max_queue
    tracer.max_queue = 0  # counted as a drop: the same work and no queue growing under the timer

    def hooks() -> None:
        phases = tracer.start(facts)
        phases.mark("identity")
        phases.mark("cache", True)
        phases.mark("policy")
        decision.phase_clock = phases
        tracer.observe(decision, facts, 0.0)

    try:
        runs = 20_000
        return min(timeit.repeat(hooks, number=runs, repeat=5, timer=time.thread_time)) / runs * 1e6
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
    decisions, rounds = (300, 2) if smoke else (1024, 24)
    results = uvloop.run(off_and_on(decisions, rounds))
    return results, report(results, decisions)


def report(results: dict[str, Any], decisions: int) -> str:
    from .harness import table

    median, rounds = results["us_per_decision"], results["rounds"]
    rows = []
    for kind in ("cached", "uncached", "cached_unsampled"):
        def delta(mode: str, clock: str) -> list[float]:  # each round's own difference
            return [on - off for on, off in zip(rounds[f"{kind}_{mode}_{clock}"], rounds[f"{kind}_off_{clock}"])]

        def shown(differences: list[float]) -> str:
            low, high = median_interval(differences)
            return f"{statistics.median(differences):+.1f} [{low:+.1f}, {high:+.1f}]"

        off_cpu, spread = median[f"{kind}_off_cpu"], rounds[f"{kind}_off_cpu"]
        rows.append([kind.replace("_", ", ") + (" (traceparent flags 00)" if "unsampled" in kind else ""),
                     f"{off_cpu:.1f}", f"{median[f'{kind}_on_cpu']:.1f}", shown(delta("on", "cpu")),
                     shown(delta("on", "loop")),
                     f"{statistics.median(delta('on', 'wall')):+.1f}", shown(delta("sdk", "cpu")),
                     f"{statistics.median(delta('sdk', 'wall')):+.1f}",
                     f"{(max(spread) - min(spread)) / min(spread) * 100:.0f} %"])
    count = len(rounds["cached_off_cpu"])
    title = (f"Tracing: µs per decision in process, off vs on (OTLP/gRPC to a local collector, until it "
             f"acknowledged the last span), {count} interleaved rounds of {decisions} requests that never repeat: "
             f"medians, and for Δ the median of the rounds' own differences [its 95 % confidence interval]")
    text = table(title, ["decision", "off CPU", "on CPU", "Δ CPU [95 %]", "of which the loop's thread", "Δ wall",
                         "SDK spans: Δ CPU [95 %]", "Δ wall", "off CPU round spread"], rows)
    text += ("\nrequest-path hooks when on (the sampler's answer, phase clock, 3 marks, what the span needs kept "
             "(cached: the span itself), queue append; CPU): "
             + ", ".join(f"{name} {us:.2f} µs" for name, us in results["hooks_us"].items()))
    per_span = results.get("tracer_thread_us_per_span", {})
    if per_span:
        text += "\ntracer thread's own CPU per span (on): " + ", ".join(f"{kind} {us:.2f} µs"
                                                                   for kind, us in per_span.items())
    load = ", ".join(f"{value:.1f}" for value in results.get("load_average", ()))
    return text + (f"\nspans made {results['spans_traced']}, received by the collector "
                   f"{results['spans_received_by_collector']}, dropped {results['spans_dropped']}; "
                   f"load average at the end {load}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tracing")
    parser.add_argument("--decisions", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--off-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--against", metavar="REF", help="also compare tracing off with git REF's tree")
    args = parser.parse_args()
    if args.off_only:
        print(json.dumps(uvloop.run(off_only(args.decisions))))
        sys.exit(0)
    measured = uvloop.run(off_and_on(args.decisions, args.rounds))
    print(report(measured, args.decisions))
    if args.against:
        compared = against(args.against, args.decisions, args.rounds)
        print(json.dumps(compared, indent=1))
    sys.exit(0)
