"""Where the gRPC path's cost per check goes, step by step, under real load.

A micro-benchmark says authz-server's Python work per cached check is ≈ 12 µs; under load
through Envoy it costs several times that. This ladder shows it: one gRPC server per step,
each doing one step more of the real check (``--only ladder``, not part of a plain
``make bench``), every step behind its own front Envoy, rounds interleaved, best run kept.

    python -m tests.bench --only ladder [--quick]
    python -m tests.bench.ladder serve STEP READY_FILE   (one step's server; used by the above)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, render_front_proxy

from .core import REQUEST_HEADERS, ROUTE_RULE
from .harness import LoadResult, Settings, bench_supervisor, load_with_cpu, start_upstream, table

STEPS = {
    "bytes": "answer fixed bytes, request left as bytes",
    "parse": "+ parse the CheckRequest (the bare yardstick does this much)",
    "facts": "+ read it into Facts (volatile fields out, fingerprint)",
    "decide": "+ identity, cache lookup, decision (answer still the fixed bytes)",
    "full": "+ its own answer (decision id, identity headers removed) and metrics: authz-server",
}
ROUNDS = 3


async def _serve(step: str, ready: Path) -> None:
    import asyncio
    import time

    from envoy.service.auth.v3 import external_auth_pb2

    from authz_server.cli import build_parser
    from authz_server.envoy import facts_from_check_request, parse_check_request
    from authz_server.serve import effective_config
    from authz_server.server import AuthorizationServicer, build_app

    args = build_parser().parse_args(["serve", "--policies", str(ROUTE_RULE), "--addr", "127.0.0.1:0",
                                      "--metrics-addr", "", "--workers", "1", "--log-level", "warning"])
    app = build_app(effective_config(args))
    allow = external_auth_pb2.CheckResponse()
    allow.status.code = 0
    allow.ok_response.SetInParent()
    fixed = allow.SerializeToString()

    async def partial(self: AuthorizationServicer, raw: bytes, context: Any) -> bytes:
        if step != "bytes":
            request = parse_check_request(raw)
            if step != "parse":
                facts = facts_from_check_request(request)
                if step == "decide":
                    await app.pipeline.decide(facts, now=time.time())
        return fixed

    if step != "full":
        AuthorizationServicer.check = partial  # type: ignore[method-assign]
    bound = await app.start()
    ready.write_text(bound["addr"])
    await asyncio.Event().wait()


def measure(settings: Settings) -> dict[str, LoadResult]:
    results: dict[str, LoadResult] = {}
    with bench_supervisor("ladder") as sup:
        upstream_addr, _ = start_upstream(sup)
        targets: dict[str, tuple[str, int]] = {}
        for step in STEPS:
            ready = sup.log_dir / f"ladder-{step}.ready"
            child = sup.start(f"ladder-{step}", [sys.executable, "-m", "tests.bench.ladder", "serve", step, str(ready)],
                              ready=lambda ready=ready: ready.exists() and ready.read_text() != "")
            envoy = start_envoy(sup, f"front-{step}", render_front_proxy(FrontProxy(
                upstream=upstream_addr, authz=AuthzTarget(ready.read_text()))))
            targets[step] = (f"http://127.0.0.1:{envoy.port('ingress')}/people/bob", child.popen.pid)
        for _ in range(ROUNDS):
            for step, (url, pid) in targets.items():
                result = load_with_cpu(url, settings, pid, name=STEPS[step], headers=REQUEST_HEADERS)
                if step not in results or result.rps > results[step].rps:
                    results[step] = result
    return results


def report(results: dict[str, LoadResult]) -> str:
    base = results["parse"].rps or 1
    return table(f"The gRPC check step by step under load (best of {ROUNDS} interleaved rounds)",
                 ["per check, cumulative", "req/s", "× parse only (the yardstick)", "server CPU µs/check"],
                 [[r.name, f"{r.rps:,.0f}", f"{r.rps / base:.2f}", f"{r.authz_cpu_us_per_req:.0f}"]
                  for r in results.values()])


def run(settings: Settings) -> tuple[dict[str, Any], str]:
    results = measure(settings)
    return results, report(results)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve" and sys.argv[2] in STEPS:
        import uvloop

        uvloop.run(_serve(sys.argv[2], Path(sys.argv[3])))
    else:
        sys.exit(f"usage: python -m tests.bench.ladder serve {{{','.join(STEPS)}}} READY_FILE")
