"""Issue 3's numbers: the token-less session path against validating the JWT on every request.

Same policy, same user, same RS256 issuer; the only difference is what the client presents
after signing in: its session id, or the JWT again (sessions off, so the server validates
the signature and claims each time).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from authz_server.config import Config, SessionsConfig
from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.identity.oidc import IssuerConfig
from authz_server.identity.resolver import SessionSettings
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, render_front_proxy
from authz_server.server import build_app

from .harness import Settings, bench_supervisor, load_with_cpu, start_authz_server, start_upstream, table

ISSUER = "https://idp.bench.test"
POLICY = 'package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.identity.user.sub == "alice"\n'


def _issuer_files(folder: Path) -> tuple[Path, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": "bench", "alg": "RS256", "use": "sig"})
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public]}))
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "sub": "alice", "aud": "orders", "iat": now, "exp": now + 3600,
                        "jti": "bench-token"}, key, algorithm="RS256", headers={"kid": "bench", "typ": "at+jwt"})
    (folder / "policies").mkdir(exist_ok=True)
    (folder / "policies" / "policy.rego").write_text(POLICY)
    return jwks, token


def _config(folder: Path, jwks: Path, *, sessions: bool) -> Config:
    return Config(policies=str(folder / "policies"), addr="", metrics_addr="",
                  issuers=(IssuerConfig.from_mapping({"issuer": ISSUER, "audiences": ["orders"],
                                                      "jwks_file": str(jwks)}, "issuers[0]"),),
                  sessions=SessionsConfig(settings=SessionSettings(enabled=sessions)))


def _request(headers: dict[str, str]) -> Any:
    return check_request_from_json({"attributes": {"request": {"http": {
        "method": "GET", "path": "/orders", "host": "orders", "headers": {"user-agent": "bench", **headers}}}}})


async def in_process(folder: Path) -> dict[str, float]:
    jwks, token = _issuer_files(folder)
    results: dict[str, float] = {}
    for sessions in (True, False):
        app = build_app(_config(folder, jwks, sessions=sessions))
        app.runtime.load()
        await app._start_identity()
        pipeline = app.pipeline
        now = time.time()
        first = await pipeline.decide(facts_from_check_request(_request({"authorization": f"Bearer {token}"})),
                                      now=now)
        assert first.allowed, first.reason
        if sessions:
            session = dict(first.identity.response_headers)["x-session-id"]
            raw = _request({"x-session-id": session}).SerializeToString()
        else:
            raw = _request({"authorization": f"Bearer {token}"}).SerializeToString()

        from authz_server.envoy import parse_check_request

        async def rounds(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                decision = await pipeline.decide(facts_from_check_request(parse_check_request(raw)), now=now)
                assert decision.allowed, decision.reason
            return (time.perf_counter() - started) / count * 1e6

        async def decisions(count: int) -> float:
            # The decision alone (identity, signals, cache): the request is parsed once.
            facts = facts_from_check_request(parse_check_request(raw))
            started = time.perf_counter()
            for _ in range(count):
                decision = await pipeline.decide(facts, now=now)
                assert decision.allowed, decision.reason
            return (time.perf_counter() - started) / count * 1e6

        await rounds(200)
        label = "session" if sessions else "jwt_each_request"
        results[f"{label}_us"] = await rounds(5000 if sessions else 1000)
        results[f"{label}_decision_us"] = await decisions(5000 if sessions else 1000)
        await app.stop(0)
    results["ratio"] = results["jwt_each_request_us"] / results["session_us"]
    results["decision_ratio"] = results["jwt_each_request_decision_us"] / results["session_decision_us"]
    return results


def through_envoy(settings: Settings, folder: Path) -> dict[str, Any]:
    jwks, token = _issuer_files(folder)
    out: dict[str, Any] = {}
    with bench_supervisor("sessions") as sup:
        upstream_addr, _ = start_upstream(sup)
        for sessions in (True, False):
            name = "session" if sessions else "jwt_each_request"
            config_file = folder / f"{name}.yaml"
            config_file.write_text(json.dumps({
                "policies": str(folder / "policies"), "metrics_addr": "", "addr": "127.0.0.1:0",
                "issuers": [{"issuer": ISSUER, "audiences": ["orders"], "jwks_file": str(jwks)}],
                "sessions": {"enabled": sessions}, "log_level": "warning"}))
            pid, bound = start_authz_server(sup, f"authz-{name}", ["--config", str(config_file), "--workers", "1"])
            envoy = start_envoy(sup, f"front-{name}", render_front_proxy(FrontProxy(
                upstream=upstream_addr, authz=AuthzTarget(bound["addr"]))))
            url = f"http://127.0.0.1:{envoy.port('ingress')}/orders"
            headers = {"authorization": f"Bearer {token}"}
            if sessions:
                import urllib.request

                with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as answer:
                    headers = {"x-session-id": answer.headers["x-session-id"]}
            out[name] = load_with_cpu(url, settings, pid, name=name, headers={**headers, "user-agent": "wrk"})
    return out


def report(inproc: dict[str, float], envoy: dict[str, Any]) -> str:
    lines = [table("Sessions vs validating the JWT on every request (in-process)",
                   ["path", "decision µs", "with request parsing µs"], [
                       ["session id (store lookup, cached decision)", f"{inproc['session_decision_us']:.1f}",
                        f"{inproc['session_us']:.1f}"],
                       ["RS256 JWT validated every request (cached decision)",
                        f"{inproc['jwt_each_request_decision_us']:.1f}", f"{inproc['jwt_each_request_us']:.1f}"],
                       ["JWT / session", f"{inproc['decision_ratio']:.1f}×", f"{inproc['ratio']:.1f}×"]])]
    if envoy:
        session, each = envoy["session"], envoy["jwt_each_request"]
        lines.append(table("Sessions vs JWT on every request, through Envoy (gRPC ext_authz)", [
            "path", "req/s", "p50 ms", "p99 ms", "authz CPU µs/req", "failures"], [
            [r.name, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
             f"{r.authz_cpu_us_per_req:.0f}" if r.authz_cpu_us_per_req else "-", r.non_2xx + r.errors]
            for r in (session, each)]))
        lines.append(f"\nsession path / JWT path req/s: {session.rps / max(each.rps, 1):.2f}×")
    return "\n".join(lines)


def run(settings: Settings, with_envoy: bool) -> tuple[dict[str, Any], str]:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="authz-bench-sessions-"))
    inproc = asyncio.run(in_process(folder))
    envoy = through_envoy(settings, folder) if with_envoy else {}
    return {"in_process": inproc, "envoy": envoy}, report(inproc, envoy)
