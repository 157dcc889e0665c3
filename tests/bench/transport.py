"""Issue 6's numbers: every way Envoy can ask, in one run, and where the CPU goes per check.

gRPC and HTTP ext_authz, over TCP and over a Unix socket (Envoy ``pipe`` cluster), against
the bare Python gRPC yardstick on the same transport and the extra-hop ceiling (Envoy's
HTTP ext_authz to a second Envoy answering 200). Then a py-spy profile of authz-server
under load in each mode, summed by function, so the next person sees the floor.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy

from .core import REQUEST_HEADERS, ROUTE_RULE
from .harness import (Settings, bench_supervisor, load_with_cpu, run_wrk, start_authz_server, start_upstream,
                      table)


def _bare_on(sup: Any, address: str) -> int:
    ready = sup.log_dir / f"bare-{abs(hash(address))}.ready"
    ready.unlink(missing_ok=True)
    child = sup.start(f"bare-{abs(hash(address))}", [sys.executable, "-m", "authz_server.evaluate.bare_authz",
                                                     "--addr", address, "--ready-file", str(ready)],
                      ready=lambda: ready.exists() and ready.read_text() != "")
    return child.popen.pid


def measure(settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="authz-bench-transport-"))
    with bench_supervisor("transport") as sup:
        upstream_addr, _ = start_upstream(sup)

        def front(name: str, target: AuthzTarget) -> str:
            envoy = start_envoy(sup, name, render_front_proxy(FrontProxy(upstream=upstream_addr, authz=target)))
            return f"http://127.0.0.1:{envoy.port('ingress')}/people/bob"

        ceiling = start_envoy(sup, "ceiling", render_front_proxy(FrontProxy(
            routes=(Route("/", direct_response=""),), listener_name="authz")))
        results["ceiling"] = load_with_cpu(front("front-ceiling", AuthzTarget(
            f"127.0.0.1:{ceiling.port('authz')}", mode="http")), settings, None,
            name="extra-hop ceiling (HTTP ext_authz → Envoy answering 200)", headers=REQUEST_HEADERS)

        for transport in ("tcp", "unix"):
            bare_addr = f"unix:{folder}/bare.sock" if transport == "unix" else "127.0.0.1:0"
            if transport == "tcp":
                from .harness import start_bare_authz

                bare_pid, bare_addr = start_bare_authz(sup)
            else:
                bare_pid = _bare_on(sup, bare_addr)
            results[f"bare_grpc_{transport}"] = load_with_cpu(front(f"front-bare-{transport}", AuthzTarget(bare_addr)),
                                                              settings, bare_pid, name=f"bare Python gRPC, {transport}",
                                                              headers=REQUEST_HEADERS)
            grpc_addr = f"unix:{folder}/authz.sock" if transport == "unix" else "127.0.0.1:0"
            http_addr = f"unix:{folder}/authz-http.sock" if transport == "unix" else "127.0.0.1:0"
            pid, bound = start_authz_server(sup, f"authz-{transport}", [
                "--policies", str(ROUTE_RULE), "--addr", grpc_addr, "--http-addr", http_addr, "--metrics-addr", "",
                "--workers", "1", "--log-level", "warning"])
            results[f"authz_grpc_{transport}"] = load_with_cpu(front(f"front-grpc-{transport}", AuthzTarget(
                bound["addr"])), settings, pid, name=f"authz-server gRPC, {transport}", headers=REQUEST_HEADERS)
            http_url = front(f"front-http-{transport}", AuthzTarget(bound["http_addr"], mode="http"))
            results[f"authz_http_{transport}"] = load_with_cpu(http_url, settings, pid,
                                                               name=f"authz-server HTTP, {transport}",
                                                               headers=REQUEST_HEADERS)
            if transport == "tcp":
                results["profile_grpc"] = _profile(pid, front("front-grpc-profile", AuthzTarget(bound["addr"])),
                                                   settings, folder / "grpc")
                results["profile_http"] = _profile(pid, http_url, settings, folder / "http")
    return results


def _profile(pid: int, url: str, settings: Settings, out: Path) -> dict[str, Any]:
    """py-spy samples of authz-server under load: how much is our request handling (anything
    under the front's handler) versus the transport around it (grpcio / uvloop native code,
    shown by py-spy as the event loop), and our functions by inclusive share."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    seconds = max(2, int(settings.duration / 2))
    raw = out.with_suffix(".txt")
    recorder = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw",
                                 "-o", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_wrk(url, settings, headers=REQUEST_HEADERS, duration=seconds + 1)
    recorder.wait(timeout=seconds + 30)
    if not raw.exists():
        return {}
    inclusive: Counter[str] = Counter()
    ours = total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if "Thread.run" in stack and "authz_server" not in stack:
            continue  # idle worker threads (policy evaluators, watchers)
        weight = int(count)
        total += weight
        names = {_function(f) for f in frames if "authz_server/" in f and "cli.py" not in f and "serve.py" not in f}
        if any(n.startswith(("AuthorizationServicer.check", "HttpFront.", "_Connection.")) for n in names):
            ours += weight
        for name in names:
            inclusive[name] += weight
    if not total:
        return {}
    return {"ours": ours / total, "functions": [(n, c / total) for n, c in inclusive.most_common(12)]}


def _function(frame: str) -> str:
    """``func (path/module.py:line)`` → ``func (module.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})"


def report(results: dict[str, Any]) -> str:
    ceiling = results["ceiling"].rps or 1
    rows = []
    for key in ("ceiling", "bare_grpc_tcp", "authz_grpc_tcp", "authz_http_tcp", "bare_grpc_unix", "authz_grpc_unix",
                "authz_http_unix"):
        result = results[key]
        bare = results[f"bare_grpc_{key.rsplit('_', 1)[-1]}"].rps if key != "ceiling" else 0
        cpu = f"{result.authz_cpu_us_per_req:.0f}" if result.authz_cpu_us_per_req else "-"
        rows.append([result.name, f"{result.rps:,.0f}", f"{result.rps / ceiling:.2f}",
                     f"{result.rps / bare:.2f}" if bare else "-", f"{result.p99_ms:.2f}", cpu,
                     result.non_2xx + result.errors])
    lines = [table("Transports, in one run (full pipeline, cached decision)", [
        "set-up", "req/s", "× extra-hop ceiling", "× bare gRPC (same transport)", "p99 ms", "authz CPU µs/check",
        "failures"], rows)]
    for mode in ("grpc", "http"):
        profile = results.get(f"profile_{mode}") or {}
        if profile:
            rows = [["request handling in authz-server's Python (the pipeline and the front)", f"{profile['ours']:.0%}"],
                    ["transport: grpcio / uvloop / kernel (the event loop's native code)",
                     f"{1 - profile['ours']:.0%}"]]
            rows += [[f"  {name[:86]}", f"{share:.1%}"] for name, share in profile["functions"]]
            lines.append(table(f"Where authz-server's CPU goes, {mode} mode (py-spy samples under load, inclusive)",
                               ["where", "share of samples"], rows))
    return "\n".join(lines)


def run(settings: Settings) -> tuple[dict[str, Any], str]:
    results = measure(settings)
    return results, report(results)
