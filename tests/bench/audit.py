"""Audit log numbers: in process (the observer, a record's CPU, the writers' rate, the event
loop's lag), and through real Envoy with the audit log off and on (``make bench`` section
``audit``, issue 28).

    python -m tests.bench --only audit [--quick | --smoke]
    python -m tests.bench.audit [--records 20000] [--postgres URL | --postgres '']

Through Envoy: two authz-server processes with the same policy and the same sessions set-up
(the route table of ``routes.py``, 1,000 users signed in once with a JWT each), one with no
audit log and one writing every decision to a file; each behind an Envoy in gRPC ext_authz
mode and one in HTTP ext_authz mode. Two kinds of traffic: one repeated request (one user's
session, one path: the decision cache answers) and traffic that does not repeat (an id in
every path, a query string, users at random: every decision is the policy's). Each is
measured with one connection (latency: p50, p99) and 32 (throughput), audit off and on
back to back, and the audit log's CPU per decision is the difference of the two servers'
CPU per request at 32 connections. A third server, a second one with the audit log off, is
loaded in the same rounds: its p99 and CPU against the first's (the control) are what these
comparisons read when nothing differs.

Without ``--postgres`` the PostgreSQL sink is measured on the private server of
``tests/support/postgres.py`` (never the machine's own); ``''`` skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from authz_server.audit import AuditLog
from authz_server.audit.sinks.file import FileSink
from authz_server.audit.sinks.postgres import PostgresSink
from authz_server.config import Config
from authz_server.decision import Pipeline
from authz_server.policy.loader import PolicyRuntime
from authz_server.server import build_identity
from tests.support.audit import (facts_for, open_session, secret_headers, secret_path, unique_table,
                                 workload, write_audit_policy)

from .harness import (LoadResult, Settings, bench_supervisor, load_with_cpu, median_interval, start_authz_server,
                      table, timed)


TYPICAL_HEADERS = {"user-agent": "curl/8.5.0", "accept": "application/json", "x-forwarded-proto": "https",
                   "x-request-id": "5f0c2a8e-2f3b-4a8e-9c1d-7b6e5d4c3b2a", "content-type": "application/json"}


async def _decisions(folder: Path, count: int, *, secrets: bool = False,
                     unique: bool = False) -> tuple[list[Any], list[Any]]:
    """``count`` decisions, half of them cache hits: a typical request (a bearer token and a
    few ordinary headers), or with ``secrets`` one carrying credentials in a dozen places;
    with ``unique``, every request has a path of its own (no record part repeats but the
    identity)."""
    runtime = PolicyRuntime(str(write_audit_policy(folder)))
    runtime.load()
    identity = build_identity(Config(trust_domains=("example.org",)))
    pipeline = Pipeline(runtime, identity=identity)
    now = time.time()
    session = await open_session(identity.store, subject="alice", spiffe_id=workload("web"), now=now)
    if secrets:
        headers, _ = secret_headers(session)
        path, _ = secret_path("/orders/1")
    else:
        headers = {**TYPICAL_HEADERS, "x-session-id": session}
        path = "/orders/1?page=2"
    facts = [facts_for((f"/orders/{i}?page=2" if unique else path) if i % 2 else
                       f"/public/{i if unique else i % 50}", principal=workload("web"), headers=headers)
             for i in range(count)]
    decisions = [await pipeline.decide(f, now=now) for f in facts]
    runtime.close()
    return decisions, facts


async def observer_cost(decisions: list[Any], facts: list[Any]) -> dict[str, float]:
    audit = AuditLog([], queue_size=len(decisions) + 10)
    d, f = decisions[0], facts[0]
    n = 0

    def enqueue() -> None:
        nonlocal n
        audit.observe(d, f, 0.0)
        n += 1
        if n % 10_000 == 0:
            audit.queue.clear()

    accepted = timed(enqueue, seconds=1.0, min_runs=10_000)
    full = AuditLog([], queue_size=1)
    full.observe(d, f, 0.0)
    dropped = timed(lambda: full.observe(d, f, 0.0), seconds=0.5, min_runs=10_000)
    miss = next(i for i, x in enumerate(decisions) if not x.cached)
    hit = next(i for i, x in enumerate(decisions) if x.cached)
    render_miss = timed(lambda: audit.render([(decisions[miss], facts[miss], 0.0, 0.0)]), seconds=1.0)
    render_hit = timed(lambda: audit.render([(decisions[hit], facts[hit], 0.0, 0.0)]), seconds=1.0)
    return {"observe_us": accepted, "observe_full_queue_us": dropped, "record_us_policy_ran": render_miss,
            "record_us_cache_hit": render_hit}


def record_cpu(decisions: list[Any], facts: list[Any], *,
               warm: tuple[list[Any], list[Any]] | None = None) -> float:
    """CPU µs per record (building, redacting, rendering; the collector's share included) over
    every decision once, in batches as the audit log's build passes take them (after ``warm``'s)."""
    audit = AuditLog([], queue_size=len(decisions) + 10)
    if warm is not None:
        audit.render([(d, f, time.time(), time.time()) for d, f in zip(*warm)])
    items = [(d, f, time.time(), time.time()) for d, f in zip(decisions, facts)]
    started = time.thread_time()
    for start in range(0, len(items), 500):
        audit.render(items[start:start + 500])
    return (time.thread_time() - started) / len(items) * 1e6


async def throughput(sink: Any, decisions: list[Any], facts: list[Any]) -> float:
    audit = AuditLog([sink], queue_size=len(decisions) + 10, sink_backlog=len(decisions) + 10)
    audit.start()
    start = time.perf_counter()
    for decision, fact in zip(decisions, facts):
        audit.observe(decision, fact, time.time())
    await audit.drain()
    elapsed = time.perf_counter() - start
    written = audit.writers[0].stats.written
    await audit.stop()
    assert written == len(decisions), (written, len(decisions))
    return len(decisions) / elapsed


# -- in process, traffic that does not repeat (issue 28)

_ENVOY_HEADERS = {"user-agent": "wrk", "x-forwarded-proto": "http"}


def _grpc_facts(request: Any, session: str | None, n: int, now: float) -> Any:
    """Facts as the gRPC front reads them: a CheckRequest as Envoy sends it, serialized, cut
    (its repeat key: the audit log reads the request's shape from it) and parsed."""
    from authz_server.envoy import check_request_from_json, cut_volatile, facts_from_check_request, parse_check_request

    headers = {":authority": "api", ":method": request.method, ":path": request.path, ":scheme": "http",
               **_ENVOY_HEADERS, "x-request-id": str(uuid.UUID(int=n))}
    if session is not None:
        headers["x-session-id"] = session
    seconds = int(now)
    document = {"attributes": {
        "source": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 40000 + n % 20000}}},
        "destination": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 10000}}},
        "request": {"time": f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{n % 10**6:06d}Z",
                    "http": {"id": str(n), "method": request.method, "headers": headers,
                             "path": request.path, "host": "api", "scheme": "http", "protocol": "HTTP/1.1"}},
        "metadataContext": {}, "routeMetadataContext": {}}}
    wire = check_request_from_json(document).SerializeToString()
    cut = cut_volatile(wire)
    return facts_from_check_request(parse_check_request(wire), None if cut is None else cut[0])


def _http_facts(request: Any, session: str | None, n: int) -> Any:
    """Facts as the HTTP front reads them: Envoy's HTTP ext_authz request."""
    from authz_server.http import HttpRequest
    from authz_server.httpfront import facts_from_http

    headers = {"host": "api", **_ENVOY_HEADERS, "x-request-id": str(uuid.UUID(int=n)),
               "x-forwarded-for": "127.0.0.1", "x-envoy-expected-rq-timeout-ms": "200", "content-length": "0"}
    if session is not None:
        headers["x-session-id"] = session
    return facts_from_http(HttpRequest(method=request.method, target=request.path, headers=headers), "")


class _VariedTraffic:
    """Traffic that does not repeat, as the Envoy section sends it: the route table of
    ``routes.py`` (a new id and query string in every path, users drawn at random from 1,000
    with a session each), read by the ``mode`` front ("grpc": real CheckRequest protobufs;
    "http": Envoy's HTTP ext_authz requests) and decided by the policy; open until ``close``."""

    def __init__(self, folder: Path, mode: str) -> None:
        from . import routes

        self.mode = mode
        self.runtime = PolicyRuntime(str(routes.write_policy(folder)))
        self.runtime.load()
        self.identity = build_identity(Config(trust_domains=("example.org",)))
        self.pipeline = Pipeline(self.runtime, identity=self.identity)
        self.now = time.time()
        self.sessions: dict[str, str] = {}

    async def sign_in(self) -> None:
        from . import routes

        self.sessions = {user: await open_session(self.identity.store, subject=user, spiffe_id="", now=self.now)
                         for user in routes.users()}

    async def decide(self, count: int, *, seed: int, first: int = 0) -> tuple[list[Any], list[Any]]:
        from . import routes

        decisions, facts = [], []
        for n, request in enumerate(routes.requests(count, seed=seed), start=first):
            session = self.sessions.get(request.user)
            fact = (_grpc_facts(request, session, n, self.now) if self.mode == "grpc"
                    else _http_facts(request, session, n))
            decisions.append(await self.pipeline.decide(fact, now=self.now))
            facts.append(fact)
        return decisions, facts

    def close(self) -> None:
        self.runtime.close()


async def sliced_record_cpu(traffic: _VariedTraffic, decisions: list[Any], facts: list[Any],
                            loop_work: int) -> float:
    """CPU µs per record as the build passes spend it in a busy server: records built in
    slices (``AuditLog.slice_seconds``), and between two slices the event loop's other work,
    ``loop_work`` decisions of new requests of the same traffic. That work leaves the record's
    code and data cold: the first records of a slice cost several times the rest. This is one
    part of why a record costs the server about twice what ``record_cpu`` measures (issue 28);
    the machine's other processes are the rest, and are not measured here."""
    audit = AuditLog([], queue_size=10)
    audit.render([(d, f, time.time(), time.time()) for d, f in zip(decisions[:len(decisions) // 2],
                                                                   facts[:len(facts) // 2])])
    audit.queue.extend((d, f, time.time(), time.time()) for d, f in zip(decisions[len(decisions) // 2:],
                                                                      facts[len(facts) // 2:]))
    count = len(audit.queue)
    turn = 0
    while audit.queue:
        await traffic.decide(loop_work, seed=1000 + turn, first=10**6 + turn * loop_work)  # the loop's turn
        turn += 1
        audit._build_slice()  # one slice, as a pass in the server builds it (and counts its CPU)
    return audit.cpu_seconds / count * 1e6


async def varied_record_cpu(folder: Path, count: int = 4000) -> dict[str, float]:
    """CPU µs per record of traffic that does not repeat, per front (what the build passes
    pay in the server, without the server's other work): the records of ``count`` such
    decisions, after the records of as many others (a server has seen its users before: what
    is kept per identity is warm, as it is after the first seconds of a run); and the same
    built in slices with the event loop's work between them (``sliced_record_cpu``)."""
    results = {}
    for mode in ("grpc", "http"):
        traffic = _VariedTraffic(folder / f"varied-{mode}", mode)
        try:
            await traffic.sign_in()
            decisions, facts = await traffic.decide(2 * count, seed=11)
            assert not any(d.cached for d in decisions)
            results[f"record_cpu_us_varied_{mode}"] = record_cpu(decisions[count:], facts[count:],
                                                                 warm=(decisions[:count], facts[:count]))
            results[f"record_cpu_us_varied_{mode}_sliced_loop_between"] = await sliced_record_cpu(
                traffic, decisions, facts, loop_work=3)
        finally:
            traffic.close()
    return results


async def main(records: int, postgres: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        decisions, facts = await _decisions(Path(tmp) / "secret-policies", 4, secrets=True)
        worst = await observer_cost(decisions, facts)
        decisions, facts = await _decisions(Path(tmp) / "policies", records)
        results: dict[str, Any] = await observer_cost(decisions, facts)
        results["record_us_with_secrets_everywhere"] = worst["record_us_policy_ran"]
        results["record_cpu_us_repeating"] = record_cpu(decisions, facts)
        unique_decisions, unique_facts = await _decisions(Path(tmp) / "unique-policies", min(records, 4000),
                                                          unique=True)
        results["record_cpu_us_each_request_new"] = record_cpu(unique_decisions, unique_facts)
        results.update(await varied_record_cpu(Path(tmp), min(records, 4000)))
        results["file_records_per_s"] = await throughput(FileSink(Path(tmp) / "audit.jsonl"), decisions, facts)
        if postgres:
            table = unique_table()
            url = f"{postgres}{'&' if '?' in postgres else '?'}table={table}"
            try:
                results["postgres_records_per_s"] = await throughput(PostgresSink(url), decisions, facts)
            finally:
                import psycopg

                with psycopg.connect(PostgresSink(url).conninfo, autocommit=True) as conn:
                    conn.execute(f'DROP TABLE IF EXISTS "{table}"')
    return results


async def loop_lag(folder: Path, *, audit_on: bool, seconds: float, rate: int = 2000) -> dict[str, float]:
    """The event loop's lag (how late a 1 ms ticker wakes) while decisions that do not repeat
    arrive at ``rate`` a second, the audit log writing each to a file or off."""
    decisions, facts = await _decisions(folder / ("lag-on" if audit_on else "lag-off"), 200)
    audit = AuditLog([FileSink(folder / "lag.jsonl")]) if audit_on else None
    if audit is not None:
        audit.start()
    lags: list[float] = []
    stop = time.perf_counter() + seconds

    async def ticker() -> None:
        while time.perf_counter() < stop:
            asked = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - asked - 0.001)

    async def arrivals() -> None:
        n = 0
        tick = 0.005
        while time.perf_counter() < stop:
            for _ in range(int(rate * tick)):  # a decision's observer call, as the pipeline makes it
                if audit is not None:
                    audit.observe(decisions[n % len(decisions)], facts[n % len(facts)], time.time())
                n += 1
            await asyncio.sleep(tick)

    await asyncio.gather(ticker(), arrivals())
    if audit is not None:
        await audit.stop()
    lags.sort()
    return {"p50_ms": lags[len(lags) // 2] * 1e3, "p99_ms": lags[int(len(lags) * 0.99)] * 1e3,
            "max_ms": lags[-1] * 1e3, "ticks": len(lags)}


# -- through Envoy

TRAFFIC = {"repeat": "one repeated request", "varied": "traffic that does not repeat"}
MODES = ("grpc", "http")


def _server_config(folder: Path, name: str, policy: Path, jwks: Path, audit: list[str]) -> Path:
    from .traffic import AUDIENCE, ISSUER

    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({
        "policies": str(policy), "addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0", "metrics_addr": "127.0.0.1:0",
        "workers": 1, "log_level": "warning", "audit": audit,
        "issuers": [{"issuer": ISSUER, "jwks_file": str(jwks), "audiences": [AUDIENCE], "algorithms": ["ES256"]}],
        "sessions": {"store": "memory", "idle_timeout": "1h", "max_lifetime": "8h"}}))
    return path


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _repeated(sessions: dict[str, str]) -> tuple[str, dict[str, str]]:
    """One allowed GET of a user who has a session: the path and its headers."""
    from . import routes

    request = next(r for r in routes.requests(500, seed=5)
                   if r.allowed and r.method == "GET" and r.user in sessions)
    return request.path, {"x-session-id": sessions[request.user], "user-agent": "wrk", "accept": "*/*"}


# Each cell's off/on pair, interleaved; the report takes the median of the rounds. One connection
# (latency: p99 wants long loads) 3 rounds of the settings' duration; 32 (throughput and the audit
# log's CPU, a difference of two processes' CPU that moves by tens of µs from one load to the next,
# more than the 40 µs judged) 9 rounds of loads half as long, for a median with a 95 % interval.
ROUNDS = 3
THROUGHPUT_ROUNDS = 9
# A second server with the audit log off, loaded in the same rounds: its p99 and CPU against the
# first's are what those comparisons of two processes read when nothing differs (the machine's
# swings and one process's luck against another's: hash seeds, memory layout), the floor under
# which "p99 on / off" and "Δ CPU" cannot tell the audit log's cost from noise.
CONTROL = "off-control"
SERVERS = ("off", "file", CONTROL)


def _audit_counters(metrics_addr: str) -> tuple[float, float, float, float]:
    """(CPU seconds of the build passes, records they built, records dropped for any reason, CPU
    seconds of the sinks' worker threads), from the server's /metrics."""
    import httpx

    text = httpx.get(f"http://{metrics_addr}/metrics", timeout=10).text
    values = {}
    dropped = sinks = 0.0
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ("authz_audit_cpu_seconds_total", "authz_audit_records_built_total"):
            values[name] = float(value)
        elif name.startswith("authz_audit_records_dropped_total{"):
            dropped += float(value)
        elif name.startswith("authz_audit_sink_cpu_seconds_total{"):
            sinks += float(value)
    return (values.get("authz_audit_cpu_seconds_total", 0.0), values.get("authz_audit_records_built_total", 0.0),
            dropped, sinks)


def _load(server: dict[str, Any], mode: str, kind: str, settings: Settings) -> LoadResult:
    url = server["fronts"][mode]
    name = f"{mode}, {TRAFFIC[kind]}, {settings.connections} conn."
    cpu, built, dropped, sinks = _audit_counters(server["metrics"])
    if kind == "repeat":
        path, headers = _repeated(server["sessions"])
        result = load_with_cpu(url + path, settings, server["pid"], name=name, headers=headers)
    else:
        result = load_with_cpu(url + "/", settings, server["pid"], name=name, script=server["script"])
    cpu_after, built_after, dropped_after, sinks_after = _audit_counters(server["metrics"])
    if built_after > built:  # warm-up included: the passes' CPU per record they built, and the sink's thread's
        result.extra["audit_us_per_record"] = (cpu_after - cpu) / (built_after - built) * 1e6
        result.extra["audit_sink_us_per_record"] = (sinks_after - sinks) / (built_after - built) * 1e6
        result.extra["audit_records_dropped"] = dropped_after - dropped
    return result


def through_envoy(settings: Settings) -> dict[str, Any]:
    from authz_server.mesh.envoy import start_envoy
    from authz_server.mesh.extauthz import AuthzTarget
    from authz_server.mesh.front import FrontProxy, render_front_proxy

    from . import routes, traffic
    from .harness import start_upstream

    results: dict[str, Any] = {}
    with bench_supervisor("audit") as sup:
        work = sup.log_dir  # its own folder: /tmp (the parent) is shared with every other run
        upstream_addr, _ = start_upstream(sup)
        policy = routes.write_policy(work / "route_table")
        key, jwks = traffic._issuer(work)
        audit_file = work / "audit.jsonl"
        servers: dict[str, dict[str, Any]] = {}
        for audit in SERVERS:
            config = _server_config(work, f"authz-audit-{audit}", policy, jwks,
                                    [f"file:{audit_file}"] if audit == "file" else [])
            pid, bound = start_authz_server(sup, f"authz-audit-{audit}", ["--config", str(config)])
            fronts = {}
            for mode in MODES:
                envoy = start_envoy(sup, f"front-{audit}-{mode}", render_front_proxy(FrontProxy(
                    upstream=upstream_addr,
                    authz=AuthzTarget(bound["addr"] if mode == "grpc" else bound["http_addr"], mode=mode))))
                fronts[mode] = f"http://127.0.0.1:{envoy.port('ingress')}"
            sessions = asyncio.run(traffic._sign_in(fronts["grpc"], key))
            servers[audit] = {"pid": pid, "fronts": fronts, "sessions": sessions, "metrics": bound["metrics_addr"],
                              # a folder each: the script's name is the same, its sessions are this server's
                              "script": traffic.write_script(_folder(sup.log_dir / audit), "session",
                                                             routes.lua_tables()
                                                             + traffic._lua_table("sessions", sessions))}
        one = dataclasses.replace(settings, connections=1, threads=1)
        full = not settings.smoke and settings.duration >= 10
        rounds, throughput_rounds = (ROUNDS, THROUGHPUT_ROUNDS) if full else (1, 1)
        many = dataclasses.replace(settings, duration=settings.duration / 2) if full else settings
        for round_ in range(throughput_rounds):
            # off, on and the control back to back, each first, second and third in turn: the
            # machine's other load hits them alike
            order = SERVERS[round_ % 3:] + SERVERS[:round_ % 3]
            loads = ((("c1", one),) if round_ < rounds else ()) + (("c32", many),)
            for mode in MODES:
                for kind in TRAFFIC:
                    for label, load_settings in loads:
                        for audit in order:
                            server = servers[audit]
                            result = _load(server, mode, kind, load_settings)
                            results.setdefault(f"{mode}_{kind}_{label}_{audit}", []).append(result)
        from authz_server.audit.sinks.file import log_files

        results["requests_audited"] = sum(r.requests for k, runs in results.items() if k.endswith("_file")
                                          for r in runs)
        results["records_in_file"] = sum(sum(1 for _ in path.open("rb")) for path in log_files(audit_file))
    return results


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else 0.0


def _p99_ratio(off: list[LoadResult], other: list[LoadResult]) -> float:
    """The median of the rounds' p99 against the off server's in the same round."""
    return _median([again.p99_ms / (first.p99_ms or 1) for first, again in zip(off, other)])


def _cpu_difference(off: list[LoadResult], other: list[LoadResult]) -> str:
    """The median of the rounds' CPU per request minus the off server's in the same round, with
    its 95 % interval."""
    differences = [(again.authz_cpu_us_per_req or 0) - (first.authz_cpu_us_per_req or 0)
                   for first, again in zip(off, other)]
    low, high = median_interval(differences)
    return f"{_median(differences):.0f} [{low:.0f}, {high:.0f}]"


def report_envoy(results: dict[str, Any]) -> str:
    rows = []
    for mode in MODES:
        for kind in TRAFFIC:
            def runs(label: str, audit: str) -> list[LoadResult]:
                return results[f"{mode}_{kind}_{label}_{audit}"]

            off32, on32, off1, on1 = runs("c32", "off"), runs("c32", "file"), runs("c1", "off"), runs("c1", "file")
            control1, control32 = runs("c1", CONTROL), runs("c32", CONTROL)
            pairs32 = list(zip(off32, on32))
            throughput = _median([on.rps / (off.rps or 1) for off, on in pairs32])
            cpu_off = _median([r.authz_cpu_us_per_req or 0 for r in off32])
            cpu_on = _median([r.authz_cpu_us_per_req or 0 for r in on32])
            # the event loop's thread alone: where the audit log's work is done (the build passes, the
            # request path's hand-over), without the policy threads' and Go runtime's own swings
            loop_difference = _median([on.extra.get("authz_loop_cpu_us_per_req", 0)
                                       - off.extra.get("authz_loop_cpu_us_per_req", 0) for off, on in pairs32])
            build32, build1 = ([r.extra["audit_us_per_record"] for r in runs
                                if "audit_us_per_record" in r.extra] for runs in (on32, on1))
            # the audit log's own CPU a record, read from the server's counters: the build passes and
            # the file sink's worker thread (not a difference of two loads: see the control)
            own32 = [r.extra["audit_us_per_record"] + r.extra.get("audit_sink_us_per_record", 0.0) for r in on32
                     if "audit_us_per_record" in r.extra]
            everything = off32 + on32 + off1 + on1 + control1 + control32
            rows.append([
                mode, TRAFFIC[kind], f"{_median([r.rps for r in off32]):,.0f}", f"{_median([r.rps for r in on32]):,.0f}",
                f"{throughput:.2f}",
                f"{_median([r.p50_ms for r in off1]):.2f} / {_median([r.p99_ms for r in off1]):.2f}",
                f"{_median([r.p50_ms for r in on1]):.2f} / {_median([r.p99_ms for r in on1]):.2f}",
                f"{_p99_ratio(off1, on1):.2f}", f"{_p99_ratio(off1, control1):.2f}", f"{cpu_off:.0f} / {cpu_on:.0f}",
                _cpu_difference(off32, on32), _cpu_difference(off32, control32), f"{loop_difference:.0f}",
                f"{_median(build32):.1f} / {_median(build1):.1f}", f"{_median(own32):.1f}",
                sum(r.errors + r.extra.get("counts", {}).get("other", 0) for r in everything),
                sum(r.extra.get("counts", {}).get("wrong", 0) for r in everything)])
    rounds = len(results[f"{MODES[0]}_repeat_c1_off"])
    throughput_rounds = len(results[f"{MODES[0]}_repeat_c32_off"])
    text = table(f"Audit log off and on, through Envoy (1 Envoy worker, 1 authz-server process, 1,000 users with "
                 f"sessions; medians of interleaved rounds, {rounds} with 1 connection, {throughput_rounds} with 32; "
                 f"targets: req/s on/off >= 0.85, 1-conn. p99 on/off <= 1.3, audit CPU <= 40 µs)",
                 ["mode", "traffic", "req/s off (32 c.)", "req/s on", "on / off", "1 conn. p50/p99 ms off", "on",
                  "p99 on / off", "p99 control / off", "authz CPU µs/req off / on", "Δ CPU µs/req [95 %]",
                  "control Δ (off, 2nd process) [95 %]", "Δ loop thread CPU µs/req",
                  "audit build µs/record 32 c. / 1 c.", "audit's own CPU µs/record (build + sink thread, 32 c.)",
                  "errors", "wrong allows"], rows)
    dropped = sum(r.extra.get("audit_records_dropped", 0) for runs in results.values() if isinstance(runs, list)
                  for r in runs)
    return text + (f"\nrecords in the audit files (the current one and the rotated ones, at most 5 x 100 MB): "
                   f"{results['records_in_file']:,} for {results['requests_audited']:,} measured requests "
                   f"(plus warm-ups and sign-ins); records the audit log dropped (authz_audit_records_dropped): "
                   f"{dropped:,.0f}")


def run(settings: Settings, *, with_envoy: bool = True) -> tuple[dict[str, Any], str]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inproc = asyncio.run(main(500 if settings.smoke else 20_000, None))
        lag_seconds = 1.0 if settings.smoke else 5.0
        lag = {audit: asyncio.run(loop_lag(folder, audit_on=audit == "on", seconds=lag_seconds))
               for audit in ("off", "on")}
    rows = [[name, f"{value:,.1f}"] for name, value in inproc.items()]
    text = table("Audit log in process (µs of CPU per call; writer rates in records/s)", ["what", "value"], rows)
    text += "\n" + table("Event loop lag, a 1 ms ticker, 2,000 decisions/s observed (ms)",
                          ["audit", "p50", "p99", "max"],
                          [[audit, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}", f"{v['max_ms']:.3f}"]
                           for audit, v in lag.items()])
    results: dict[str, Any] = {"in_process": inproc, "loop_lag": lag}
    if with_envoy:
        envoy = through_envoy(settings)
        results["envoy"] = envoy
        text += "\n" + report_envoy(envoy)
    return results, text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.audit")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--postgres", default=None, help="a server's URL, '' to skip PostgreSQL (default: a private "
                                                          "server, tests/support/postgres.py)")
    args = parser.parse_args()
    if args.postgres is None:
        from tests.support.postgres import postgres_url

        args.postgres = postgres_url()
    print(json.dumps(asyncio.run(main(args.records, args.postgres or None)), indent=2))
    sys.exit(0)
