"""Load plumbing shared by ``make bench`` (tests/bench) and ``authz-server evaluate``: wrk runs
against real Envoy, CPU and memory accounting from /proc, tables.

Benchmarks are not tests: they print numbers, and ratios measured in the same run are what
the README and the closing notes quote (absolute figures move with the machine). wrk's own
``--latency`` table stops at 50/75/90/99 %; a small Lua ``done`` hook prints 95 % (and the
mean) from the same histogram.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from authz_server.mesh.processes import Supervisor, wait_until

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class LoadResult:
    name: str
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p95_ms: float = 0.0
    p90_ms: float = 0.0
    mean_ms: float = 0.0
    non_2xx: int = 0
    errors: int = 0
    authz_cpu_us_per_req: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    duration: float = 10.0
    warmup: float = 2.0
    connections: int = 32
    threads: int = 2
    repeats: int = 1
    smoke: bool = False  # does every part run? (one-second loads, one round: numbers mean nothing)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(duration=3.0, warmup=1.0)

    @classmethod
    def smoke_test(cls) -> "Settings":
        return cls(duration=1.0, warmup=1.0, connections=8, smoke=True)


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return 0.0
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


# Percentiles wrk's --latency table leaves out, from the same histogram (microseconds).
PERCENTILES_LUA = """
done = function(summary, latency, requests)
  for _, p in pairs({50, 90, 95, 99}) do
    io.write(string.format("PCT %g %d\\n", p, latency:percentile(p)))
  end
  io.write(string.format("MEAN %f\\n", latency.mean))
end
"""


def _percentiles_script() -> str:
    import tempfile

    path = Path(tempfile.gettempdir()) / f"authz-wrk-percentiles-{os.getuid()}.lua"
    if not path.exists() or path.read_text() != PERCENTILES_LUA:
        # other runs on the machine may read it meanwhile: they see the old file or the new, whole
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".lua", delete=False) as fresh:
            fresh.write(PERCENTILES_LUA)
        os.replace(fresh.name, path)
    return str(path)


def run_wrk(url: str, settings: Settings, *, headers: dict[str, str] | None = None,
            duration: float | None = None, script: str | None = None) -> LoadResult:
    """wrk against ``url``. A ``script`` of one's own must print the ``PCT``/``MEAN`` lines of
    ``PERCENTILES_LUA`` from its ``done``; any ``COUNT name value`` line it prints lands in
    ``extra["counts"]``."""
    argv = [wrk_binary() or "wrk", "-t", str(settings.threads), "-c", str(settings.connections),
            "-d", f"{max(1, round(duration or settings.duration))}s", "--latency", "--timeout", "5s",
            "-s", script or _percentiles_script()]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=(duration or settings.duration) + 30).stdout
    result = LoadResult(name=url)
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", out):
        result.requests = int(m.group(1))
        result.seconds = _ms(m.group(2) + m.group(3)) / 1000
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result.rps = float(m.group(1))
    if m := re.search(r"\n\s+50%\s+(\S+)", out):
        result.p50_ms = _ms(m.group(1))
    if m := re.search(r"\n\s+99%\s+(\S+)", out):
        result.p99_ms = _ms(m.group(1))
    for m in re.finditer(r"^PCT ([\d.]+) (\d+)$", out, re.MULTILINE):
        value = int(m.group(2)) / 1000
        setattr(result, {"50": "p50_ms", "90": "p90_ms", "95": "p95_ms", "99": "p99_ms"}[m.group(1)], value)
    if m := re.search(r"^MEAN ([\d.]+)$", out, re.MULTILINE):
        result.mean_ms = float(m.group(1)) / 1000
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result.non_2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result.errors = sum(int(g) for g in m.groups())
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^COUNT (\S+) (\d+)$", out, re.MULTILINE)}
    if counts:
        result.extra["counts"] = counts
    return result


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _cpu_ticks(stat: str) -> int:
    """User+system CPU in clock ticks from a ``/proc`` ``stat`` file (0 when it cannot be read)."""
    try:
        fields_ = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields_[11]) + int(fields_[12])  # utime, stime


def cpu_seconds(pid: int) -> float:
    """User+system CPU of ``pid`` and all its descendants."""
    return sum(_cpu_ticks(f"/proc/{p}/stat") for p in _descendants(pid)) / CLOCK_TICKS


def main_thread_cpu_seconds(pid: int) -> float:
    """User+system CPU of ``pid``'s main thread alone: in ``serve``, the event loop's thread, where
    the request path and the audit log's build passes run (the policy's evaluations, the sinks'
    writers and the Go runtime are threads of their own). 0 when it cannot be read."""
    return _cpu_ticks(f"/proc/{pid}/task/{pid}/stat") / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    total = 0
    for p in _descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def load_with_cpu(url: str, settings: Settings, authz_pid: int | None, *, name: str,
                  headers: dict[str, str] | None = None, others: dict[str, int] | None = None,
                  script: str | None = None) -> LoadResult:
    """wrk against ``url`` after a warm-up; the best of ``settings.repeats`` runs. CPU per request
    of ``authz_pid`` (its main thread's alone in ``extra["authz_loop_cpu_us_per_req"]``; each of
    ``others``', e.g. the Envoy in front, in ``extra["cpu_us_per_req"]``)."""
    run_wrk(url, settings, headers=headers, duration=settings.warmup, script=script)
    best: LoadResult | None = None
    for _ in range(settings.repeats):
        before = cpu_seconds(authz_pid) if authz_pid else 0.0
        loop_before = main_thread_cpu_seconds(authz_pid) if authz_pid else 0.0
        others_before = {label: cpu_seconds(pid) for label, pid in (others or {}).items()}
        result = run_wrk(url, settings, headers=headers, script=script)
        if authz_pid and result.requests:
            result.authz_cpu_us_per_req = (cpu_seconds(authz_pid) - before) / result.requests * 1e6
            result.extra["authz_loop_cpu_us_per_req"] = \
                (main_thread_cpu_seconds(authz_pid) - loop_before) / result.requests * 1e6
            result.extra["authz_rss_mb"] = round(rss_mb(authz_pid), 1)
        if others and result.requests:
            result.extra["cpu_us_per_req"] = {
                label: (cpu_seconds(pid) - others_before[label]) / result.requests * 1e6
                for label, pid in others.items()}
        if best is None or result.rps > best.rps:
            best = result
    assert best is not None
    best.name = name
    return best


def start_upstream(supervisor: Supervisor) -> tuple[str, int]:
    """An Envoy answering 200 at once, an upstream that costs next to nothing: its
    ``host:port`` and pid."""
    from authz_server.mesh.envoy import start_envoy
    from authz_server.mesh.front import FrontProxy, Route, render_front_proxy

    upstream = start_envoy(supervisor, "upstream", render_front_proxy(FrontProxy(
        routes=(Route("/", direct_response="ok"),), listener_name="upstream")))
    return f"127.0.0.1:{upstream.port('upstream')}", upstream.child.popen.pid


def start_authz_server(supervisor: Supervisor, name: str, args: list[str], *, timeout: float = 60) -> tuple[int, dict]:
    ready = supervisor.log_dir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    child = supervisor.start(name, [sys.executable, "-m", "authz_server.cli", "serve", "--ready-file", str(ready),
                                    *args], ready=ready.exists, timeout=timeout)
    return child.popen.pid, json.loads(ready.read_text())


def start_bare_authz(supervisor: Supervisor) -> tuple[int, str]:
    ready = supervisor.log_dir / "bare.ready"
    ready.unlink(missing_ok=True)
    child = supervisor.start("bare-authz", [sys.executable, "-m", "authz_server.evaluate.bare_authz", "--ready-file",
                                            str(ready)], ready=lambda: ready.exists() and ready.read_text() != "")
    return child.popen.pid, ready.read_text().strip()


def timed(fn: Callable[[], Any], *, seconds: float = 1.0, min_runs: int = 200) -> float:
    """Mean µs per call of ``fn`` over about ``seconds``."""
    runs = 0
    start = time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if runs >= min_runs and elapsed >= seconds:
            return elapsed / runs * 1e6


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [f"\n### {title}\n", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(x).rjust(w) if isinstance(x, (int, float)) or str(x)[:1].isdigit()
                                       else str(x).ljust(w) for x, w in zip(row, widths)) + " |")
    return "\n".join(lines)


@contextmanager
def bench_supervisor(name: str) -> Iterator[Supervisor]:
    import tempfile

    with Supervisor(Path(tempfile.mkdtemp(prefix=f"authz-bench-{name}-"))) as sup:
        yield sup


def save(results: dict[str, Any], path: Path) -> None:
    def plain(value: Any) -> Any:
        if isinstance(value, LoadResult):
            return asdict(value)
        return value

    path.write_text(json.dumps(results, default=plain, indent=2))


def wait_port(port: int) -> None:
    from authz_server.mesh.processes import tcp_ready

    wait_until(tcp_ready("127.0.0.1", port), timeout=10, what=f"port {port}")
