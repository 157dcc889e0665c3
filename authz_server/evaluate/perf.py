"""Performance through real Envoy, every set-up in one run (``load.py``: wrk, CPU from /proc).

Set-ups, each a front Envoy (one worker) proxying ``GET /account`` to an upstream Envoy that
answers 200 itself (so the service costs next to nothing):

* **baseline** — Envoy alone: routed, nothing checked;
* **zero trust, session id** — ext_authz gRPC to ``authz-server serve`` (shipped policies, the
  evaluated world's identity settings, audit log to a file); the client presents the session id
  it got for its JWT;
* **zero trust, JWT every request** — the same with sessions off: the token is validated on each
  request;
* **Envoy jwt_authn + RBAC** — Envoy's native filters: the JWT checked against the same keys
  (``local_jwks``), then an RBAC policy equal to the route's rule (GET/POST on /account for a
  verified user);
* **bare gRPC yardstick** — ext_authz to a Python gRPC server that allows everything unread:
  the floor under which no Python ext_authz server goes, used to split the cost;
* **zero trust, session id, no audit log** — the session set-up without its decision log, to
  tell the audit log's share;
* **zero trust, session id, HTTP ext_authz** — the session set-up through Envoy's HTTP ext_authz
  protocol (authz-server's fast mode) instead of gRPC.

Each set-up is also run with one connection (one request at a time): the latency a request
pays when nothing queues.

The in-process pieces (identity lookup, policy evaluation, JWT validation, response) are timed
in ``breakdown`` to say where the time goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from ..envoy import check_response_bytes, facts_from_check_request, parse_check_request
from ..facts import build_input
from ..policy.engine import encode_input
from ..mesh.envoy import start_envoy
from ..mesh.extauthz import AuthzTarget
from ..mesh.front import FrontProxy, Route, render_front_proxy
from ..mesh.processes import Supervisor
from .inprocess import IDP_ISSUER, InProcessTarget, InProcessWorld, copy_policies
from .load import (LoadResult, Settings, load_with_cpu, run_wrk, start_authz_server, start_bare_authz, start_upstream,
                   wrk_binary)
from .model import AUDIENCE, Request
from .world import authz_settings

Progress = Callable[[str], None]
PATH = "/account"
CONTEXT = {"service": "frontend", "sensitivity": "medium"}
SETUPS = ("baseline", "zt_session", "zt_jwt", "native_jwt_rbac", "bare_grpc", "zt_session_noaudit",
          "zt_session_http")
LABELS = {
    "baseline": "Envoy alone (baseline)",
    "zt_session": "zero trust, session id",
    "zt_jwt": "zero trust, JWT validated every request",
    "native_jwt_rbac": "Envoy jwt_authn + RBAC (native)",
    "bare_grpc": "Envoy + bare Python gRPC ext_authz (yardstick)",
    "zt_session_noaudit": "zero trust, session id, audit log off",
    "zt_session_http": "zero trust, session id, HTTP ext_authz (fast mode)",
}


def native_filters(jwks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Envoy's own answer to the route's rule: jwt_authn (issuer, audience, the provider's keys
    inline) and an RBAC policy allowing GET/POST on /account to a token with a subject."""
    jwt_authn = {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"idp": {"issuer": IDP_ISSUER, "audiences": [AUDIENCE],
                              "local_jwks": {"inline_string": json.dumps(jwks)}, "forward": False,
                              "payload_in_metadata": "jwt_payload"}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
    }}
    method = {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": m}}}
                                     for m in ("GET", "POST")]}}
    rbac = {"rules": {"action": "ALLOW", "policies": {"users-on-account": {
        "permissions": [{"and_rules": {"rules": [method, {"url_path": {"path": {"prefix": "/account"}}}]}}],
        "principals": [{"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                     "path": [{"key": "jwt_payload"}, {"key": "sub"}],
                                     "value": {"string_match": {"safe_regex": {"regex": ".+"}}}}}],
    }}}}
    return jwt_authn, rbac


def render_native(upstream: str, jwks: dict[str, Any]) -> dict[str, Any]:
    jwt_authn, rbac = native_filters(jwks)
    config = render_front_proxy(FrontProxy(upstream=upstream, rbac=rbac))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, jwt_authn)  # authenticate first, then RBAC reads the payload
    return config


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            return answer.status, dict(answer.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items())


async def measure(policies: Path, folder: Path, settings: Settings, *, progress: Progress) -> dict[str, Any]:
    if wrk_binary() is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    world = await InProcessWorld.create(policies, folder / "inprocess", limits=None, audit=False)
    try:
        token = world.forge.valid("alice")
        jwks = world.idp.jwks()
        breakdown = await in_process_breakdown(world, token)
    finally:
        await world.close()
    progress(f"performance: in-process pieces timed (session decision {breakdown['decision_us']:.0f} µs, "
             f"JWT validation {breakdown['jwt_validate_us']:.0f} µs)")
    results = await asyncio.to_thread(_through_envoy, policies, folder, settings, token, jwks, progress)
    return {"setups": {k: asdict(v) for k, v in results.items()}, "breakdown": breakdown,
            "settings": asdict(settings), "machine": {"cpus": os.cpu_count()}}


def _through_envoy(policies: Path, folder: Path, settings: Settings, token: str, jwks: dict[str, Any],
                   progress: Progress) -> dict[str, LoadResult]:
    jwks_file = folder / "idp.jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    policies, _data = copy_policies(policies, folder)
    bearer = {"authorization": f"Bearer {token}", "user-agent": "wrk"}
    results: dict[str, LoadResult] = {}
    with Supervisor(folder / "logs") as sup:
        upstream_addr, upstream_pid = start_upstream(sup)
        pids = {"upstream_envoy": upstream_pid}

        def front(name: str, config: dict[str, Any]) -> tuple[str, int]:
            envoy = start_envoy(sup, name, config)
            return f"http://127.0.0.1:{envoy.port('ingress')}{PATH}", envoy.child.popen.pid

        def run(key: str, url: str, envoy_pid: int, authz_pid: int | None, headers: dict[str, str]) -> None:
            result = load_with_cpu(url, settings, authz_pid, name=LABELS[key], headers=headers,
                                   others={"front_envoy": envoy_pid, **pids})
            alone = run_wrk(url, replace(settings, connections=1, threads=1), headers=headers,
                            duration=max(1.0, settings.duration / 3))
            result.extra["one_connection"] = {"rps": alone.rps, "p50_ms": alone.p50_ms, "p99_ms": alone.p99_ms,
                                              "mean_ms": alone.mean_ms}
            results[key] = result
            cpu = result.extra.get("cpu_us_per_req", {})
            progress(f"performance: {LABELS[key]}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                     f"p99 {result.p99_ms:.2f} ms, Envoy {cpu.get('front_envoy', 0):.0f} µs/req"
                     + (f", authz-server {result.authz_cpu_us_per_req:.0f} µs/req" if result.authz_cpu_us_per_req
                        else "") + (f", {result.non_2xx + result.errors} failures" if result.non_2xx + result.errors
                                    else ""))

        url, pid = front("front-baseline", render_front_proxy(FrontProxy(upstream=upstream_addr)))
        run("baseline", url, pid, None, bearer)

        route = (Route("/", context_extensions=dict(CONTEXT)),)

        def run_authz(key: str, sessions: bool, audit: bool, *, http: bool = False) -> None:
            sub = folder / key
            config = authz_settings(policies=policies, folder=sub, issuer=IDP_ISSUER, jwks_file=jwks_file,
                                    limits=None, audit=audit, sessions=sessions)
            config.pop("exchange")
            if http:
                config["http_addr"] = "127.0.0.1:0"
            config_file = sub / "authz-server.yaml"
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            authz_pid, bound = start_authz_server(sup, f"authz-{key}", ["--config", str(config_file)])
            # HTTP ext_authz has no per-route context: the route's settings travel as headers Envoy adds.
            target = (AuthzTarget(bound["http_addr"], mode="http",
                                  http_headers_to_add=tuple((f"x-authz-ctx-{k}", v) for k, v in CONTEXT.items()))
                      if http else AuthzTarget(bound["addr"]))
            url, pid = front(f"front-{key}", render_front_proxy(FrontProxy(upstream=upstream_addr, authz=target,
                                                                           routes=route)))
            headers = dict(bearer)
            status, answer = _get(url, headers)
            if status != 200:
                raise RuntimeError(f"{LABELS[key]}: the first request with alice's token got HTTP {status}")
            if sessions:
                session = {k.lower(): v for k, v in answer.items()}.get("x-session-id", "")
                if not session:
                    raise RuntimeError("zero trust with sessions: no x-session-id in the answer to the JWT")
                headers = {"x-session-id": session, "user-agent": "wrk"}
            run(key, url, pid, authz_pid, headers)

        run_authz("zt_session", True, True)
        run_authz("zt_jwt", False, True)
        url, pid = front("front-native", render_native(upstream_addr, jwks))
        status, _ = _get(url, bearer)
        if status != 200:
            raise RuntimeError(f"native jwt_authn + RBAC refused alice's valid token (HTTP {status})")
        denied, _ = _get(url, {"user-agent": "probe"})
        if denied == 200:
            raise RuntimeError("native jwt_authn + RBAC let a request without a token through")
        run("native_jwt_rbac", url, pid, None, bearer)

        bare_pid, bare_addr = start_bare_authz(sup)
        url, pid = front("front-bare", render_front_proxy(FrontProxy(upstream=upstream_addr,
                                                                     authz=AuthzTarget(bare_addr))))
        run("bare_grpc", url, pid, bare_pid, bearer)
        run_authz("zt_session_noaudit", True, False)
        run_authz("zt_session_http", True, True, http=True)
    return results


async def in_process_breakdown(world: InProcessWorld, token: str) -> dict[str, float]:
    """Microseconds per call of each piece of the session path, measured in this process."""
    target = InProcessTarget(world)
    first = await target.send(Request("frontend", "GET", PATH, None, (("authorization", f"Bearer {token}"),)))
    if not first.session_id:
        raise RuntimeError(f"in-process: alice's token did not yield a session (HTTP {first.status} {first.code})")
    app = world.app
    assert app.identity is not None and app.identity.tokens is not None and app.runtime.active is not None
    raw_session = world.check_request(Request("frontend", "GET", PATH, None,
                                              (("x-session-id", first.session_id),)), "1").SerializeToString()
    now = world.clock.now

    async def per_call(make: Callable[[], Any], rounds: int) -> float:
        for _ in range(min(rounds, 200)):
            await make()
        started = time.perf_counter()
        for _ in range(rounds):
            await make()
        return (time.perf_counter() - started) / rounds * 1e6

    def facts() -> Any:
        return facts_from_check_request(parse_check_request(raw_session))

    parsed = facts()

    async def parse() -> Any:
        return facts()

    async def resolve() -> Any:  # the request already parsed: the identity step alone
        return await app.identity.resolve(parsed, now)  # type: ignore[union-attr]

    async def decide() -> Any:  # identity, signals, decision cache, verdict
        return await app.pipeline.decide(parsed, now=now)

    decision = await decide()
    identity = decision.identity
    active = app.runtime.active
    document = build_input(facts(), identity.document, {})

    async def evaluate() -> Any:
        return await active.evaluate(encode_input(build_input(facts(), identity.document, {}, active.input_tree)),
                                     timeout=1.0)

    async def render() -> Any:
        return check_response_bytes(decision)

    async def validate() -> Any:
        return await app.identity.tokens.validate(token, now=now)  # type: ignore[union-attr]

    assert document["identity"]["user"]["sub"] == "alice"
    return {
        "parse_us": await per_call(parse, 5000),
        "identity_us": await per_call(resolve, 5000),
        "decision_us": await per_call(decide, 5000),
        "policy_eval_uncached_us": await per_call(evaluate, 1000),
        "render_us": await per_call(render, 5000),
        "jwt_validate_us": await per_call(validate, 1000),
    }


def overhead(setups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The zero-trust set-ups against the baseline, as the papers state theirs."""
    base = setups.get("baseline") or {}
    out: dict[str, Any] = {}
    alone = (base.get("extra") or {}).get("one_connection") or {}
    for key in ("zt_session", "zt_jwt", "native_jwt_rbac", "zt_session_http"):
        other = setups.get(key)
        if not other or not base.get("rps"):
            continue
        other_alone = (other.get("extra") or {}).get("one_connection") or {}
        out[key] = {
            "one_connection_mean_change_pct": ((other_alone["mean_ms"] / alone["mean_ms"] - 1) * 100)
            if alone.get("mean_ms") and other_alone.get("mean_ms") else None,
            "rps_change_pct": (other["rps"] / base["rps"] - 1) * 100,
            "mean_latency_change_pct": ((other["mean_ms"] / base["mean_ms"] - 1) * 100)
            if base.get("mean_ms") else None,
            "p50_change_pct": ((other["p50_ms"] / base["p50_ms"] - 1) * 100) if base.get("p50_ms") else None,
            "p99_change_pct": ((other["p99_ms"] / base["p99_ms"] - 1) * 100) if base.get("p99_ms") else None,
        }
    return out


def where_time_goes(setups: dict[str, dict[str, Any]], pieces: dict[str, float]) -> dict[str, Any]:
    """CPU per request of the session path split by component: Envoy's parts from the front
    Envoy's CPU in the baseline and yardstick set-ups, the gRPC floor from the yardstick, the
    audit log from the session set-up with and without it, identity and policy from the
    in-process timings, and the rest of authz-server as what remains."""
    def cpu(key: str, what: str) -> float | None:
        setup = setups.get(key) or {}
        if what == "authz":
            return setup.get("authz_cpu_us_per_req")
        return (setup.get("extra", {}).get("cpu_us_per_req") or {}).get(what)

    envoy_base = cpu("baseline", "front_envoy")
    envoy_bare = cpu("bare_grpc", "front_envoy")
    bare = cpu("bare_grpc", "authz")
    session = cpu("zt_session", "authz")
    quiet = cpu("zt_session_noaudit", "authz")
    jwt = cpu("zt_jwt", "authz")
    if None in (envoy_base, envoy_bare, bare, session):
        return {}
    assert envoy_base is not None and envoy_bare is not None and bare is not None and session is not None
    audit = max(session - quiet, 0.0) if quiet is not None else 0.0
    above_floor = max(session - audit - bare, 0.0)
    identity = min(pieces.get("identity_us", 0.0), above_floor)
    decision = min(max(pieces.get("decision_us", 0.0) - pieces.get("identity_us", 0.0), 0.0), above_floor - identity)
    rows = [
        ("Envoy: HTTP proxying (the baseline's front Envoy)", envoy_base),
        ("Envoy: ext_authz filter and its gRPC client", max(envoy_bare - envoy_base, 0.0)),
        ("gRPC transport: the Python gRPC server floor (bare yardstick)", bare),
        ("identity: session lookup and identity document", identity),
        ("policy: decision cache and verdict (Rego runs only on a miss)", decision),
        ("rest of the pipeline: CheckRequest parsing, response, metrics, event loop",
         above_floor - identity - decision),
        ("audit log: one redacted JSON record per decision", audit),
    ]
    out: dict[str, Any] = {"session_path_us": [{"part": part, "cpu_us": round(value, 1)} for part, value in rows]}
    if jwt is not None:
        out["jwt_extra_us"] = round(max(jwt - session, 0.0), 1)
    out["policy_eval_uncached_us"] = round(pieces.get("policy_eval_uncached_us", 0.0), 1)
    out["jwt_validate_in_process_us"] = round(pieces.get("jwt_validate_us", 0.0), 1)
    out["p50_ms"] = {key: setups[key].get("p50_ms") for key in SETUPS if key in setups}
    return out
