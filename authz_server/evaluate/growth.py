"""Cost growth: as the policy grows (10, 100, 1,000 rules) and as the session store fills
(10³ … 10⁶ live sessions).

Policies, in-process, decision cache off (every decision evaluates the policy): two ways a
policy grows — the shipped ``authz.rego`` over a route table of N entries in its data (how
this project's policy grows), and N hand-written ``allow`` rules in Rego (how OPA-Envoy
tutorial policies grow). Each is timed for a request that matches the first rule, the last,
and none.

Sessions, each size in a child process of its own (``python -m authz_server.evaluate.growth
sessions N``) so its memory is measured alone: the memory store filled with N sessions shaped as
the identity service makes them, then lookups of random live sessions, by the store and by the
identity service from a request's ``x-session-id``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import yaml

from ..decision import DecisionSettings, Pipeline
from ..envoy import check_request_from_json, facts_from_check_request, input_from_request_json
from ..identity.resolver import IdentityService, SessionSettings
from ..identity.sessions import Binding, MemoryStore, Session, new_session_id, session_key
from ..identity.spiffe import accept_trust_domains
from ..identity.workloads import PrincipalVerifier
from ..policy.loader import PolicyRuntime
from .model import FRONTEND, TRUSTED_DOMAINS

Progress = Callable[[str], None]
POLICY_SIZES = (10, 100, 1000)
SESSION_SIZES = (1_000, 10_000, 100_000, 1_000_000)
SERVICE = "catalog"


def data_policy(folder: Path, rules: int, shipped: Path) -> Path:
    """The shipped policy over a generated route table of ``rules`` entries."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped / "authz.rego", folder / "authz.rego")
    routes = [{"prefix": f"/r{i}/", "methods": ["GET", "POST"], "sensitivity": "medium", "callers": [FRONTEND]}
              for i in range(rules)]
    (folder / "data.yaml").write_text(yaml.safe_dump({"services": {SERVICE: {"routes": routes}}}))
    return folder


def rego_policy(folder: Path, rules: int) -> Path:
    """``rules`` separate ``allow`` rules, one per path, in Rego."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["package envoy.authz", "", "import rego.v1", "", "default allow := false", ""]
    for i in range(rules):
        lines += ["allow if {", f'\tinput.parsed_path[0] == "r{i}"',
                  '\tinput.attributes.request.http.method in {"GET", "POST"}',
                  f'\tinput.identity.workload.spiffe_id == "{FRONTEND}"', "}", ""]
    (folder / "policy.rego").write_text("\n".join(lines))
    return folder


def _facts(path: str) -> Any:
    return facts_from_check_request(check_request_from_json({"attributes": {
        "source": {"address": {"socketAddress": {"address": "10.0.0.7", "portValue": 41000}}, "principal": FRONTEND},
        "contextExtensions": {"service": SERVICE, "sensitivity": "medium"},
        "request": {"http": {"method": "GET", "path": path, "host": SERVICE, "headers": {"user-agent": "growth"}}}}}))


async def _per_call(call: Callable[[], Awaitable[Any]], *, seconds: float, minimum: int = 20) -> float:
    """Median µs per call over about ``seconds`` (after a few calls to warm up)."""
    for _ in range(10):
        await call()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(samples) < minimum or time.perf_counter() < deadline:
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
        if len(samples) > 100_000:
            break
    return statistics.median(samples)


async def policy_growth(shipped: Path, folder: Path, *, sizes: tuple[int, ...] = POLICY_SIZES,
                        seconds: float = 1.0, progress: Progress = lambda _l: None) -> list[dict[str, Any]]:
    rows = []
    for rules in sizes:
        for variant in ("route table (shipped authz.rego)", "Rego allow rules"):
            where = folder / f"{'data' if variant.startswith('route') else 'rego'}-{rules}"
            source = data_policy(where, rules, shipped) if variant.startswith("route") else rego_policy(where, rules)
            runtime = PolicyRuntime(str(source), read_request=input_from_request_json)
            started = time.perf_counter()
            runtime.load()
            load_s = time.perf_counter() - started
            identity = IdentityService(SessionSettings(enabled=False),
                                       workloads=PrincipalVerifier(accept_trust_domains(TRUSTED_DOMAINS)))
            # a generous deadline: this measures how decisions grow with the rules, and a busy
            # machine must not turn a slow first evaluation into a deny (the timeout is tested elsewhere)
            pipeline = Pipeline(runtime, settings=DecisionSettings(cache_max_entries=0, policy_timeout=60.0),
                                identity=identity)
            now = time.time()
            timings: dict[str, float] = {}
            for case, path, allowed in (("first", "/r0/item", True), ("last", f"/r{rules - 1}/item", True),
                                        ("none", "/nowhere", False)):
                decision = await pipeline.decide(_facts(path), now=now)
                if decision.allowed != allowed:
                    raise RuntimeError(f"policy growth, {variant} with {rules} rules: {path} was "
                                       f"{'allowed' if decision.allowed else 'denied'} ({decision.code})")

                async def decide(path: str = path) -> Any:
                    return await pipeline.decide(_facts(path), now=now)

                timings[case] = await _per_call(decide, seconds=seconds / 3)
            runtime.close()
            rows.append({"rules": rules, "variant": variant, "load_ms": round(load_s * 1000, 1),
                         **{f"{case}_us": round(value, 1) for case, value in timings.items()}})
            progress(f"growth: {variant}, {rules} rules: decision {timings['first']:.0f}/{timings['last']:.0f}/"
                     f"{timings['none']:.0f} µs (first/last/no match, uncached), loaded in {load_s * 1000:.0f} ms")
    return rows


# -- sessions, measured in a child process per size

def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _sessions_probe(count: int, seconds: float) -> dict[str, Any]:
    gc.collect()
    rss_before = _rss_kb()
    store = MemoryStore(max_sessions=count + 10)
    now = time.time()
    keep_every = max(1, count // 2000)
    sample: list[str] = []
    started = time.perf_counter()
    for i in range(count):
        session_id = new_session_id()
        subject = f"user-{i}"
        await store.create(Session(
            key=session_key(session_id), subject=subject, issuer="https://idp.example.org",
            claims={"sub": subject, "iss": "https://idp.example.org", "aud": "mesh", "scope": "orders:read",
                    "roles": ["customer"], "client_id": "web", "jti": f"jti-{i}"},
            created=now, expires=now + 8 * 3600, idle_timeout=900, binding=Binding(),
            generation=0, jti=f"jti-{i}", last_seen=now), now=now)
        if i % keep_every == 0:
            sample.append(session_id)
    fill_s = time.perf_counter() - started
    gc.collect()
    rss_after = _rss_kb()
    rng = random.Random(count)
    keys = [session_key(s) for s in sample]

    async def lookup() -> Any:
        return await store.lookup(rng.choice(keys), now=now)

    identity = IdentityService(SessionSettings(), store=store)
    requests = {s: facts_from_check_request(check_request_from_json({"attributes": {"request": {"http": {
        "method": "GET", "path": "/orders", "headers": {"x-session-id": s}}}}})) for s in sample[:500]}
    choices = list(requests)

    async def resolve() -> Any:
        return await identity.resolve(requests[rng.choice(choices)], now)

    return {"sessions": count, "fill_s": round(fill_s, 2),
            "rss_mb": round((rss_after - rss_before) / 1024, 1),
            "bytes_per_session": round((rss_after - rss_before) * 1024 / count),
            "lookup_us": round(await _per_call(lookup, seconds=seconds), 2),
            "resolve_us": round(await _per_call(resolve, seconds=seconds), 2)}


def session_growth(*, sizes: tuple[int, ...] = SESSION_SIZES, seconds: float = 1.0,
                   progress: Progress = lambda _l: None) -> list[dict[str, Any]]:
    rows = []
    for count in sizes:
        answer = subprocess.run([sys.executable, "-m", "authz_server.evaluate.growth", "sessions", str(count),
                                 "--seconds", str(seconds)], capture_output=True, text=True, timeout=900)
        if answer.returncode != 0:
            raise RuntimeError(f"session growth with {count:,} sessions failed: {answer.stderr.strip()[-500:]}")
        row = json.loads(answer.stdout.strip().splitlines()[-1])
        rows.append(row)
        progress(f"growth: {count:,} sessions: {row['rss_mb']} MB ({row['bytes_per_session']} B each), lookup "
                 f"{row['lookup_us']} µs, identity from x-session-id {row['resolve_us']} µs")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="one session-store growth probe (run by authz-server evaluate)")
    parser.add_argument("what", choices=["sessions"])
    parser.add_argument("count", type=int)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_sessions_probe(args.count, args.seconds))))


if __name__ == "__main__":
    main()
