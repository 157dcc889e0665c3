"""One request sent again and again (the best case): the decision core in-process, and through real
Envoy with wrk.

Set-ups measured in one run, each a front Envoy (one worker) proxying to an upstream that
is itself an Envoy answering 200 (so the upstream costs next to nothing):
  envoy alone · envoy + native RBAC · envoy + bare Python ext_authz (yardstick) ·
  envoy + authz-server (full pipeline, cached decision) with 1 and 2 worker processes.
The pairs the targets compare (authz-server with one process against the yardstick in gRPC
mode, against the extra-hop ceiling in HTTP mode) are measured ROUNDS times each, interleaved,
and each set-up keeps its best run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

from authz_server.decision import Pipeline
from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.facts import build_input
from authz_server.mesh.demo import tutorial_token
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy
from authz_server.policy.engine import encode_input
from authz_server.policy.loader import PolicyRuntime

from .harness import (LoadResult, Settings, bench_supervisor, interleave, load_with_cpu, start_authz_server,
                      start_bare_authz, start_upstream, table, timed)

HERE = Path(__file__).parent
REPO = HERE.parents[1]
TUTORIAL = REPO / "tests" / "vectors" / "opa_envoy" / "tutorial"
ROUTE_RULE = HERE / "policies" / "route_rule"
RBAC_RULE = {"rules": {"action": "ALLOW", "policies": {"guests-read-people": {
    "permissions": [{"and_rules": {"rules": [
        {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
        {"url_path": {"path": {"prefix": "/people"}}}]}}],
    "principals": [{"header": {"name": "x-role", "string_match": {"exact": "guest"}}}],
}}}}
REQUEST_HEADERS = {"x-role": "guest", "user-agent": "wrk", "accept": "*/*"}
ROUNDS = 5


def _tutorial_request(token: str) -> Any:
    return check_request_from_json({"attributes": {
        "source": {"address": {"socketAddress": {"address": "10.1.2.3", "portValue": 40000}}},
        "destination": {"address": {"socketAddress": {"address": "10.1.2.4", "portValue": 8000}}},
        "request": {"http": {
            "id": "1", "method": "GET", "path": "/people/bob", "host": "people", "scheme": "http",
            "protocol": "HTTP/1.1",
            "headers": {":authority": "people", ":method": "GET", ":path": "/people/bob", ":scheme": "http",
                        "authorization": f"Bearer {token}", "user-agent": "curl/8.0", "accept": "*/*",
                        "x-request-id": "9f0c", "x-forwarded-proto": "http"}}}}})


async def in_process() -> dict[str, float]:
    runtime = PolicyRuntime(str(TUTORIAL))
    runtime.load()
    request = _tutorial_request(tutorial_token("guest", "bob", now=time.time(), ttl=3600))
    cached = Pipeline(runtime)
    now = time.time()
    # Drive the coroutine by hand: no event-loop scheduling noise in a micro-benchmark.
    def run_sync(pipeline: Pipeline) -> Any:
        coro = pipeline.decide(facts_from_check_request(request), now=now)
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("decision did not complete synchronously")

    first = await cached.decide(facts_from_check_request(request), now=now)
    assert first.allowed, first.reason
    hit_us = timed(lambda: run_sync(cached))
    active = runtime.active
    assert active is not None
    evaluator = active.pool.compiled.new_evaluator()
    document = encode_input(build_input(facts_from_check_request(request), {}, {}, active.input_tree))
    eval_us = timed(lambda: evaluator.evaluate(document), seconds=1.0, min_runs=100)
    evaluator.close()

    async def miss_loop(pipeline: Pipeline, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            decision = await pipeline.decide(facts_from_check_request(request), now=now)
        assert decision.allowed and not decision.cached
        return (time.perf_counter() - start) / n * 1e6

    # The server's default: every evaluation on a worker thread, the deadline kept.
    uncached = Pipeline(runtime)
    uncached.cache.max_entries = 0
    await miss_loop(uncached, 200)
    miss_us = await miss_loop(uncached, 2000)
    runtime.close()
    # The same evaluated on the event loop (isolation: inline): what the thread hand-off costs.
    inline = PolicyRuntime(str(TUTORIAL), isolation="inline")
    inline.load()
    uncached = Pipeline(inline)
    uncached.cache.max_entries = 0
    await miss_loop(uncached, 200)
    inline_us = await miss_loop(uncached, 2000)
    inline.close()
    return {"cache_hit_us": hit_us, "cache_miss_us": miss_us, "cache_miss_inline_us": inline_us,
            "policy_eval_only_us": eval_us, "decisions_per_s_cached": 1e6 / hit_us,
            "decisions_per_s_uncached": 1e6 / miss_us}


def through_envoy(settings: Settings) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The set-ups' best runs, and authz-server (1 process) ÷ its reference in each round: the
    bare yardstick for gRPC, the extra-hop ceiling for HTTP mode."""
    results: dict[str, Any] = {}
    rounds: dict[str, list[float]] = {"grpc": [], "http": []}
    with bench_supervisor("core") as sup:
        upstream_addr, _ = start_upstream(sup)

        def front(name: str, **kwargs: Any) -> str:
            envoy = start_envoy(sup, name, render_front_proxy(FrontProxy(upstream=upstream_addr, **kwargs)))
            return f"http://127.0.0.1:{envoy.port('ingress')}/people/bob"

        def load(url: str, name: str, pid: int | None = None) -> Callable[[], LoadResult]:
            return lambda: load_with_cpu(url, settings, pid, name=name, headers=REQUEST_HEADERS)

        results["envoy_alone"] = load(front("envoy-alone"), "Envoy alone")()
        results["envoy_rbac"] = load(front("envoy-rbac", rbac=RBAC_RULE), "Envoy + native RBAC")()
        ceiling_envoy = start_envoy(sup, "ceiling-authz", render_front_proxy(FrontProxy(
            routes=(Route("/", direct_response=""),), listener_name="authz")))
        ceiling = load(front("envoy-ceiling", authz=AuthzTarget(f"127.0.0.1:{ceiling_envoy.port('authz')}",
                                                                mode="http")),
                       "Envoy + ext_authz HTTP to an Envoy answering 200 (extra-hop ceiling)")
        results["hop_ceiling"] = ceiling()
        bare_pid, bare_addr = start_bare_authz(sup)
        bare = load(front("envoy-bare", authz=AuthzTarget(bare_addr)), "Envoy + bare Python gRPC (always allow)",
                    bare_pid)
        results["bare_grpc"] = bare()
        for workers in (1, 2):
            pid, bound = start_authz_server(sup, f"authz-{workers}w", [
                "--policies", str(ROUTE_RULE), "--addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
                "--metrics-addr", "", "--workers", str(workers), "--log-level", "warning"])
            grpc = load(front(f"envoy-authz-{workers}w", authz=AuthzTarget(bound["addr"], connections=workers)),
                        f"Envoy + authz-server gRPC, {workers} process(es)", pid)
            http = load(front(f"envoy-authz-http-{workers}w", authz=AuthzTarget(bound["http_addr"], mode="http")),
                        f"Envoy + authz-server HTTP, {workers} process(es)", pid)
            results[f"authz_grpc_{workers}w"] = grpc()
            results[f"authz_http_{workers}w"] = http()
            if workers == 1:
                # The targets compare these pairs: each set-up gets the best of ROUNDS runs,
                # interleaved with its reference, and each round's own ratio is kept (report: medians).
                more = 0 if settings.smoke else ROUNDS - 1
                interleave(results, rounds["grpc"], "bare_grpc", bare, "authz_grpc_1w", grpc, more)
                interleave(results, rounds["http"], "hop_ceiling", ceiling, "authz_http_1w", http, more)
    return results, rounds


def report(inproc: dict[str, float], envoy: dict[str, Any], rounds: dict[str, list[float]]) -> str:
    lines = [table("In-process decisions (OPA-Envoy tutorial policy)", ["measure", "value"], [
        ["cached decision (facts + identity + cache lookup)", f"{inproc['cache_hit_us']:.1f} µs"],
        ["uncached decision (full pipeline, policy on an evaluation thread)", f"{inproc['cache_miss_us']:.1f} µs"],
        ["  of which policy evaluation (the OPA engine, input as JSON)", f"{inproc['policy_eval_only_us']:.1f} µs"],
        ["uncached decision, policy on the event loop (isolation: inline)",
         f"{inproc['cache_miss_inline_us']:.1f} µs"],
        ["cached decisions per second, one core", f"{inproc['decisions_per_s_cached']:,.0f}"],
        ["uncached decisions per second, one core", f"{inproc['decisions_per_s_uncached']:,.0f}"],
    ])]
    rbac = envoy["envoy_rbac"].rps or 1
    bare = envoy["bare_grpc"].rps or 1
    ceiling = envoy["hop_ceiling"].rps or 1
    rows = []
    for result in envoy.values():
        cpu = f"{result.authz_cpu_us_per_req:.0f}" if result.authz_cpu_us_per_req else "-"
        rows.append([result.name, f"{result.rps:,.0f}", f"{result.rps / rbac:.2f}", f"{result.rps / bare:.2f}",
                     f"{result.rps / ceiling:.2f}", f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}", cpu,
                     result.non_2xx + result.errors])
    lines.append(table("Through Envoy (1 Envoy worker, upstream an Envoy answering 200, wrk 32 connections)", [
        "set-up", "req/s", "× native RBAC", "× bare gRPC", "× hop ceiling", "p50 ms", "p99 ms",
        "authz CPU µs/req", "failures"], rows))
    for mode, pair in (("grpc", "gRPC (1 process) ÷ bare gRPC"), ("http", "HTTP (1 process) ÷ the hop ceiling")):
        if rounds.get(mode):
            lines.append(f"authz-server {pair}, round by round: {', '.join(f'{r:.2f}' for r in rounds[mode])}; "
                         f"median {statistics.median(rounds[mode]):.2f}")
    return "\n".join(lines)
