"""Traffic that does not repeat, through real Envoy: what real users send.

Every request carries a fresh id in its path and a query string, from one of 1,000 users
(5 % strangers), so neither the repeat path nor the decision cache can answer for the
policy. Set-ups, each measured with the same traffic in one run:

* the route table (``routes.py``: 50 routes matched with ``glob.match``, the users' roles in
  ``data.json``) with the user named by a header, then by a session (signed in once with a
  JWT of their own), with one process and with one per core;
* Envoy's native RBAC filter with the same rules, and the bare always-allow Python gRPC
  server (the yardstick), on the same traffic;
* the OPA-Envoy tutorial policy, each user with a JWT of their own, and the yardstick on that
  traffic.

Answers are checked twice. Before the load, a sample of the same model goes through Envoy one
request at a time and each status is compared with the model's (``wrong answers``). Under
load, the upstream echoes the expectation the script put in each request (``x-expect``), so a
request let through that should have been denied is counted (``wrong allows``), and the
denials are counted against the number the script expected.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import uvloop
from cryptography.hazmat.primitives.asymmetric import ec

from authz_server.decision import DecisionSettings, Pipeline
from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.facts import build_input
from authz_server.identity.verified import NO_IDENTITY
from authz_server.mesh.demo import tutorial_token
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy
from authz_server.policy.engine import encode_input
from authz_server.policy.loader import PolicyRuntime

from . import routes
from .harness import (PERCENTILES_LUA, LoadResult, Settings, bench_supervisor, interleave, load_with_cpu,
                      start_authz_server, start_bare_authz, table)

HERE = Path(__file__).parent
TUTORIAL = HERE.parents[0] / "vectors" / "opa_envoy" / "tutorial"
ISSUER, AUDIENCE = "https://idp.bench.test", "bench-api"
SAMPLE = 600  # requests checked one by one for each set-up
ROUNDS = 3  # the headline pair (yardstick, authz-server 1 process) is measured this many times, interleaved
IN_PROCESS_ROUNDS = 3  # every in-process set-up in turn, this many times (report: each figure's median)

ROUTE_LUA = r"""
local methods = {"GET", "GET", "POST", "PUT", "DELETE", "PATCH"}

local function allowed(method, service, user_roles)
  local who
  if method == "GET" then who = "read" elseif method == "POST" or method == "PUT" then who = "write"
  elseif method == "DELETE" then who = "admin" else return false end
  for _, r in ipairs(user_roles or {}) do
    if r == "admin" then return true end
    if who ~= "admin" and (r == "editor" or r == service .. ":editor") then return true end
    if who == "read" and r == "viewer" then return true end
  end
  return false
end

function make_request()
  local user
  if math.random() > 0.05 then user = users[math.random(#users)] else user = "stranger" .. math.random(1000000) end
  local service = services[math.random(#services)]
  local method = methods[math.random(#methods)]
  local item = method == "PUT" or method == "DELETE" or method == "PATCH" or (method == "GET" and math.random() < 0.7)
  local path = "/api/v1/" .. service
  if item then path = path .. "/" .. math.random(1000000000) end
  path = path .. "?page=" .. math.random(0, 99) .. "&trace=" .. string.format("%x", math.random(1000000000))
  return method, path, user, allowed(method, service, roles[user])
end
"""

TUTORIAL_LUA = r"""
function make_request()
  local i = math.random(#tokens)
  local role = token_roles[i]
  if math.random() < 0.1 then
    return "POST", "/people", i, false  -- no body: the tutorial policy cannot allow it
  end
  local path = "/people/" .. math.random(1000000000) .. "?fields=" .. math.random(0, 9)
  return "GET", path, i, role == "guest" or role == "admin"
end
"""

COMMON_LUA = r"""
local threads = {}
local counter = 0

setup = function(thread)
  thread:set("thread_id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

init = function(args)
  math.randomseed(os.time() * 100 + thread_id * 7919)
  expected_deny, ok, denied, wrong, other = 0, 0, 0, 0, 0
end

request = function()
  local method, path, who, allow = make_request()
  if not allow then expected_deny = expected_deny + 1 end
  local headers = {["x-expect"] = allow and "allow" or "deny"}
  identify(headers, who)
  return wrk.format(method, path, headers)
end

response = function(status, headers, body)
  if status == 200 then
    ok = ok + 1
    if headers["x-was"] == "deny" then wrong = wrong + 1 end
  elseif status == 403 then denied = denied + 1
  else other = other + 1 end
end
"""

DONE_LUA = r"""
local percentiles_done = done
done = function(summary, latency, requests)
  percentiles_done(summary, latency, requests)
  local totals = {expected_deny = 0, ok = 0, denied = 0, wrong = 0, other = 0}
  for _, t in ipairs(threads) do
    for name, _ in pairs(totals) do totals[name] = totals[name] + t:get(name) end
  end
  for name, value in pairs(totals) do io.write(string.format("COUNT %s %d\n", name, value)) end
end
"""

IDENTIFY = {
    "header": 'identify = function(headers, user) headers["x-user"] = user end',
    "session": 'identify = function(headers, user) local s = sessions[user]; '
               'if s then headers["x-session-id"] = s end end',
    "tutorial": 'identify = function(headers, i) headers["authorization"] = "Bearer " .. tokens[i] end',
}


def _lua_table(name: str, values: dict[str, str] | list[str]) -> str:
    if isinstance(values, list):
        return f"{name} = {{{', '.join(json.dumps(v) for v in values)}}}\n"
    return f"{name} = {{{', '.join(f'[{json.dumps(k)}] = {json.dumps(v)}' for k, v in values.items())}}}\n"


def write_script(folder: Path, kind: str, tables: str) -> str:
    body = TUTORIAL_LUA if kind == "tutorial" else ROUTE_LUA
    path = folder / f"traffic-{kind}.lua"
    path.write_text(tables + body + IDENTIFY[kind] + "\n" + COMMON_LUA + PERCENTILES_LUA + DONE_LUA)
    return str(path)


# -- identities: sessions signed in with a JWT each, and the tutorial's tokens

def _issuer(folder: Path) -> tuple[Any, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = folder / "bench.jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "bench", "alg": "ES256", "use": "sig"}]}))
    return key, jwks


def _user_token(key: Any, user: str, now: float) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": user, "iat": int(now), "exp": int(now) + 3600,
              "jti": base64.urlsafe_b64encode(os.urandom(12)).decode()}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "bench"})


async def _sign_in(front: str, key: Any) -> dict[str, str]:
    """Each known user calls once with a JWT (a read their roles allow): their session id."""
    now = time.time()
    table = routes.users()
    sessions: dict[str, str] = {}
    limit = asyncio.Semaphore(16)

    async def one(client: httpx.AsyncClient, user: str, roles: list[str]) -> None:
        service = next((r.split(":")[0] for r in roles if ":" in r), routes.SERVICES[0])
        async with limit:
            answer = await client.get(f"{front}/api/v1/{service}",
                                      headers={"authorization": f"Bearer {_user_token(key, user, now)}"})
        if answer.status_code == 200 and "x-session-id" in answer.headers:
            sessions[user] = answer.headers["x-session-id"]

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(one(client, user, roles) for user, roles in table.items()))
    return sessions


def _tutorial_tokens() -> tuple[list[str], list[str]]:
    now = time.time()
    roles = ["guest"] * 6 + ["admin"] + ["nobody"] * 3
    chosen = [roles[n % len(roles)] for n in range(routes.USERS)]
    return [tutorial_token(role, f"user{n:04d}", now=now, ttl=3600) for n, role in enumerate(chosen)], chosen


# -- the sample checked one request at a time

async def _check_sample(front: str, kind: str, identities: dict[str, Any], size: int = SAMPLE) -> int:
    wrong = 0
    async with httpx.AsyncClient(timeout=30) as client:
        if kind == "tutorial":
            tokens, roles = identities["tokens"], identities["roles"]
            for n in range(size):
                i = (n * 7919) % len(tokens)
                post = n % 10 == 0
                path = "/people" if post else f"/people/{n * 104729}?fields={n % 10}"
                answer = await client.request("POST" if post else "GET", front + path,
                                              headers={"authorization": f"Bearer {tokens[i]}"})
                expected = 403 if post or roles[i] not in ("guest", "admin") else 200
                wrong += answer.status_code != expected
            return wrong
        for request in routes.requests(size, seed=11):
            headers = {"x-user": request.user} if kind == "header" else (
                {"x-session-id": identities["sessions"][request.user]} if request.user in identities["sessions"]
                else {})
            answer = await client.request(request.method, front + request.path, headers=headers)
            wrong += answer.status_code != (200 if request.allowed else 403)
    return wrong


# -- in process: CPU per uncached decision, the engine included

def _route_checks(count: int) -> list[Any]:
    return [check_request_from_json({"attributes": {
        "source": {"address": {"socketAddress": {"address": "10.1.2.3", "portValue": 40000 + n % 20000}}},
        "request": {"http": {"id": str(n), "method": r.method, "path": r.path, "host": "api", "scheme": "http",
                             "headers": {":method": r.method, ":path": r.path, ":authority": "api", "x-user": r.user,
                                         "user-agent": "bench/1.0", "accept": "*/*", "x-request-id": f"{n:x}"}}}}})
        for n, r in enumerate(routes.requests(count, seed=3))]


def _tutorial_checks(count: int) -> list[Any]:
    tokens, _ = _tutorial_tokens()
    return [check_request_from_json({"attributes": {
        "source": {"address": {"socketAddress": {"address": "10.1.2.3", "portValue": 40000}}},
        "request": {"http": {"id": str(n), "method": "GET", "path": f"/people/{n * 7919}?fields={n % 9}",
                             "host": "people", "headers": {":method": "GET", ":authority": "people",
                                                           "authorization": f"Bearer {tokens[n % len(tokens)]}",
                                                           "user-agent": "bench/1.0", "x-request-id": f"{n:x}"}}}}})
        for n in range(count)]


async def _cpu_per_decision(folder: Path, checks: list[Any], *, threads: int, isolation: str = "thread",
                            concurrency: int = 1) -> tuple[float, float]:
    """(CPU µs per decision, every thread of the process counted; decisions per second)."""
    runtime = PolicyRuntime(str(folder), pool_size=threads, isolation=isolation)
    runtime.load()
    pipeline = Pipeline(runtime, settings=DecisionSettings(cache_max_entries=0))  # every one a miss
    now = time.time()
    try:
        for check in checks[:len(checks) // 10]:  # warm: engines, glob cache, allocator
            await pipeline.decide(facts_from_check_request(check), now=now)
        cpu, wall = time.process_time(), time.perf_counter()
        if concurrency == 1:
            for check in checks:
                await pipeline.decide(facts_from_check_request(check), now=now)
        else:
            for start in range(0, len(checks), concurrency):
                await asyncio.gather(*(pipeline.decide(facts_from_check_request(c), now=now)
                                       for c in checks[start:start + concurrency]))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        runtime.close()
    return cpu / len(checks) * 1e6, len(checks) / wall


def _engine_alone(folder: Path, checks: list[Any]) -> float:
    """CPU µs per evaluation of the same inputs (projected and encoded as the pipeline makes
    them, made beforehand) by one engine called directly: the floor under a decision that
    the bindings set, nothing of ours around it but the call."""
    runtime = PolicyRuntime(str(folder), pool_size=1, isolation="inline")
    active = runtime.load()
    inputs = [encode_input(build_input(facts_from_check_request(check), NO_IDENTITY.document, {}, active.input_tree))
              for check in checks]
    evaluator = active.pool.compiled.new_evaluator()
    try:
        for input_json in inputs[:len(inputs) // 10]:
            evaluator.evaluate(input_json)
        cpu = time.process_time()
        for input_json in inputs:
            evaluator.evaluate(input_json)
        return (time.process_time() - cpu) / len(inputs) * 1e6
    finally:
        evaluator.close()
        runtime.close()


async def _in_process_round(folder: Path, route: list[Any], tutorial: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    out["route_cpu_us"], out["route_rate_seq"] = await _cpu_per_decision(folder, route, threads=1)
    out["route_inline_cpu_us"], _ = await _cpu_per_decision(folder, route, threads=1, isolation="inline")
    out["tutorial_cpu_us"], out["tutorial_rate_seq"] = await _cpu_per_decision(TUTORIAL, tutorial, threads=1)
    out["tutorial_inline_cpu_us"], _ = await _cpu_per_decision(TUTORIAL, tutorial, threads=1, isolation="inline")
    out["tutorial_cpu_us_32_1t"], out["tutorial_rate_32_1t"] = await _cpu_per_decision(
        TUTORIAL, tutorial, threads=1, concurrency=32)
    out["route_engine_cpu_us"] = _engine_alone(folder, route)
    out["tutorial_engine_cpu_us"] = _engine_alone(TUTORIAL, tutorial)
    for threads in (1, 2):
        out[f"route_cpu_us_32_{threads}t"], out[f"route_rate_32_{threads}t"] = await _cpu_per_decision(
            folder, route, threads=threads, concurrency=32)
    return out


async def in_process(folder: Path, count: int = 3000, rounds: int = IN_PROCESS_ROUNDS) -> dict[str, Any]:
    """Each figure's median over ``rounds`` rounds of every set-up in turn: one set-up measures
    for well under a second, and on a shared VM a second can be a slow one (the same tutorial
    decisions measured 121–275 µs inline in back-to-back runs)."""
    route, tutorial = _route_checks(count), _tutorial_checks(count)
    measured = [await _in_process_round(folder, route, tutorial) for _ in range(rounds)]
    out: dict[str, Any] = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
    out["by_round"] = {key: [m[key] for m in measured] for key in ("route_inline_cpu_us", "tutorial_inline_cpu_us")}
    return out


def report_in_process(figures: dict[str, Any]) -> str:
    rows = [
        ["route table (50 routes, 1,000 users), one at a time, on the evaluation thread",
         f"{figures['route_cpu_us']:.0f}", f"{figures['route_rate_seq']:,.0f}"],
        ["  the same evaluated on the event loop (isolation: inline)", f"{figures['route_inline_cpu_us']:.0f}", "-"],
        ["  32 at a time, 1 evaluation thread", f"{figures['route_cpu_us_32_1t']:.0f}",
         f"{figures['route_rate_32_1t']:,.0f}"],
        ["  32 at a time, 2 evaluation threads", f"{figures['route_cpu_us_32_2t']:.0f}",
         f"{figures['route_rate_32_2t']:,.0f}"],
        ["OPA-Envoy tutorial policy (a JWT per user), one at a time", f"{figures['tutorial_cpu_us']:.0f}",
         f"{figures['tutorial_rate_seq']:,.0f}"],
        ["  the same evaluated on the event loop (isolation: inline)", f"{figures['tutorial_inline_cpu_us']:.0f}", "-"],
        ["  32 at a time, 1 evaluation thread", f"{figures['tutorial_cpu_us_32_1t']:.0f}",
         f"{figures['tutorial_rate_32_1t']:,.0f}"],
        ["the engine alone, the same inputs made beforehand: route table / tutorial",
         f"{figures['route_engine_cpu_us']:.0f} / {figures['tutorial_engine_cpu_us']:.0f}", "-"],
    ]
    text = table("In process: uncached decisions on traffic that does not repeat (full pipeline, OPA engine "
                 "included; CPU of every thread; each figure the median of its rounds)",
                 ["set-up", "CPU µs per decision", "decisions/s"], rows)
    by_round = figures["by_round"]
    return text + (f"\n2 evaluation threads ÷ 1, decisions/s at 32 in flight: "
                   f"{figures['route_rate_32_2t'] / figures['route_rate_32_1t']:.2f}"
                   f"\ninline µs, round by round: route table "
                   f"{', '.join(f'{v:.0f}' for v in by_round['route_inline_cpu_us'])}; tutorial "
                   f"{', '.join(f'{v:.0f}' for v in by_round['tutorial_inline_cpu_us'])}")


# -- the run

def run(settings: Settings, *, with_envoy: bool = True) -> tuple[dict[str, Any], str]:
    with bench_supervisor("traffic") as sup:
        work = sup.log_dir  # a folder of this run's own (its parent is the shared /tmp)
        # On the loop serve runs (serve._run_loop: uvloop): the default asyncio loop's cross-thread
        # wake-up and timers cost ≈ 50 µs more an evaluation handed to a thread, which serve never pays.
        inproc = uvloop.run(in_process(routes.write_policy(work / "route_table"), 300 if settings.smoke else 3000,
                                       1 if settings.smoke else IN_PROCESS_ROUNDS))
        if not with_envoy:
            return {"in_process": inproc}, report_in_process(inproc)
        envoy, rounds = _through_envoy(settings, sup, work)
    return ({"in_process": inproc, "envoy": envoy, "rounds": rounds},
            report_in_process(inproc) + "\n" + report(envoy, rounds))


def _through_envoy(settings: Settings, sup: Any, work: Path) -> tuple[dict[str, LoadResult], list[float]]:
    results: dict[str, Any] = {}
    rounds: list[float] = []
    cores = len(os.sched_getaffinity(0))
    sample = 50 if settings.smoke else SAMPLE
    upstream = start_envoy(sup, "upstream", render_front_proxy(FrontProxy(routes=(Route(
        "/", direct_response="ok", response_headers=(("x-was", "%REQ(x-expect)%"),)),), listener_name="upstream")))
    upstream_addr = f"127.0.0.1:{upstream.port('upstream')}"
    policy = routes.write_policy(work / "route_table")
    key, jwks = _issuer(work)
    session_config = work / "sessions.yaml"
    session_config.write_text(json.dumps({
        "policies": str(policy), "addr": "127.0.0.1:0", "metrics_addr": "", "workers": 1, "log_level": "warning",
        "issuers": [{"issuer": ISSUER, "jwks_file": str(jwks), "audiences": [AUDIENCE], "algorithms": ["ES256"]}],
        "sessions": {"store": "memory", "idle_timeout": "1h", "max_lifetime": "8h"}}))
    tokens, token_roles = _tutorial_tokens()
    tables = {"header": routes.lua_tables(), "tutorial": _lua_table("tokens", tokens)
              + _lua_table("token_roles", token_roles)}

    def front(name: str, **kwargs: Any) -> str:
        envoy = start_envoy(sup, name, render_front_proxy(FrontProxy(upstream=upstream_addr, **kwargs)))
        return f"http://127.0.0.1:{envoy.port('ingress')}"

    def load(url: str, pid: int | None, name: str, kind: str, script_tables: str) -> LoadResult:
        script = write_script(sup.log_dir, kind, script_tables)
        return load_with_cpu(url + "/", settings, pid, name=name, script=script)

    bare_pid, bare_addr = start_bare_authz(sup)
    bare_url = front("front-bare", authz=AuthzTarget(bare_addr))
    results["bare"] = load(bare_url, bare_pid, "bare Python gRPC, always allow (the yardstick)", "header",
                           tables["header"])
    rbac_url = front("front-rbac", rbac=routes.rbac_config())
    results["rbac"] = load(rbac_url, None, "Envoy native RBAC, the same 50 routes x 1,000 users", "header",
                           tables["header"])
    results["rbac"].extra["wrong_sample"] = asyncio.run(_check_sample(rbac_url, "header", {}, size=sample))

    servers = {}
    for workers in sorted({1, cores}):
        pid, bound = start_authz_server(sup, f"authz-{workers}w", [
            "--policies", str(policy), "--addr", "127.0.0.1:0", "--metrics-addr", "", "--workers", str(workers),
            "--log-level", "warning"])
        servers[workers] = (pid, front(f"front-authz-{workers}w", authz=AuthzTarget(bound["addr"],
                                                                                     connections=workers)))
    pid, url = servers[1]

    def ours() -> LoadResult:
        return load(url, pid, "authz-server, route table, user in a header, 1 process", "header", tables["header"])

    def yardstick() -> LoadResult:
        return load(bare_url, bare_pid, results["bare"].name, "header", tables["header"])

    results["route_header_1"] = ours()
    sample_1 = asyncio.run(_check_sample(url, "header", {}, size=sample))
    interleave(results, rounds, "bare", yardstick, "route_header_1", ours, 0 if settings.smoke else ROUNDS - 1)
    results["route_header_1"].extra["wrong_sample"] = sample_1
    if cores > 1:
        pid_n, url_n = servers[cores]
        results["route_header_n"] = load(url_n, pid_n, f"authz-server, route table, user in a header, {cores} "
                                         "processes", "header", tables["header"])
        results["route_header_n"].extra["wrong_sample"] = asyncio.run(_check_sample(url_n, "header", {}, size=sample))

    pid_s, bound_s = start_authz_server(sup, "authz-sessions", ["--config", str(session_config)])
    url_s = front("front-sessions", authz=AuthzTarget(bound_s["addr"]))
    sessions = asyncio.run(_sign_in(url_s, key))
    results["route_session_1"] = load(url_s, pid_s, f"authz-server, route table, {len(sessions):,} users with "
                                      "sessions, 1 process", "session",
                                      tables["header"] + _lua_table("sessions", sessions))
    results["route_session_1"].extra["wrong_sample"] = asyncio.run(
        _check_sample(url_s, "session", {"sessions": sessions}, size=sample))

    results["bare_tutorial"] = load(bare_url, bare_pid, "bare Python gRPC, tutorial traffic (the yardstick)",
                                    "tutorial", tables["tutorial"])
    pid_t, bound_t = start_authz_server(sup, "authz-tutorial", [
        "--policies", str(TUTORIAL), "--addr", "127.0.0.1:0", "--metrics-addr", "", "--workers", "1",
        "--log-level", "warning"])
    url_t = front("front-tutorial", authz=AuthzTarget(bound_t["addr"]))
    results["tutorial_1"] = load(url_t, pid_t, "authz-server, OPA-Envoy tutorial policy, a JWT per user, "
                                 "1 process", "tutorial", tables["tutorial"])
    results["tutorial_1"].extra["wrong_sample"] = asyncio.run(
        _check_sample(url_t, "tutorial", {"tokens": tokens, "roles": token_roles}, size=sample))
    return results, rounds


def report(results: dict[str, LoadResult], rounds: list[float]) -> str:
    bare, tutorial_bare = results["bare"].rps or 1, results["bare_tutorial"].rps or 1
    rows = []
    for key, result in results.items():
        yardstick = tutorial_bare if "tutorial" in key else bare
        counts = result.extra.get("counts", {})
        cpu = f"{result.authz_cpu_us_per_req:.0f}" if result.authz_cpu_us_per_req else "-"
        denied = f"{counts.get('denied', 0):,} / {counts.get('expected_deny', 0):,}" if key.startswith(
            ("route", "rbac", "tutorial_")) else "-"
        sample = result.extra.get("wrong_sample")
        rows.append([result.name, f"{result.rps:,.0f}", f"{result.rps / yardstick:.2f}", f"{result.p50_ms:.2f}",
                     f"{result.p99_ms:.2f}", cpu, "-" if sample is None else f"{sample} / {SAMPLE}",
                     counts.get("wrong", 0) if key != "bare" and key != "bare_tutorial" else "-", denied,
                     counts.get("other", 0) + result.errors])
    text = table("Traffic that does not repeat, through Envoy (1 Envoy worker, wrk 32 connections, an id in every "
                 "path, 1,000 users)", ["set-up", "req/s", "× yardstick, same traffic", "p50 ms", "p99 ms",
                                        "authz CPU µs/req", "wrong answers (sample)", "wrong allows under load",
                                        "denied / expected", "errors"], rows)
    if rounds:
        text += (f"\nauthz-server (route table, 1 process) ÷ yardstick, round by round: "
                 f"{', '.join(f'{r:.2f}' for r in rounds)}; median {statistics.median(rounds):.2f}")
    return text
