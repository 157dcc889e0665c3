"""Issue 7's number: what all signals together add to a decision, measured side by side.

Same pipeline, same default policy, cached decisions; once without signals, once with a
per-identity and a per-route token bucket (memory), the anomaly detector and a threat list of
10,000 entries (IPs, CIDRs, SPIFFE IDs, subjects).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from authz_server.config import Config
from authz_server.envoy import check_request_from_json, facts_from_check_request, parse_check_request
from authz_server.server import build_app
from authz_server.signals import SignalsConfig

from .harness import table

REPO = Path(__file__).resolve().parents[2]


def _threat_file(folder: Path) -> Path:
    rng = random.Random(1)
    lines = [f"198.18.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(6000)]
    lines += [f"100.{rng.randrange(64, 128)}.{rng.randrange(256)}.0/24" for _ in range(2000)]
    lines += [f"spiffe://evil{n}.org/*" for n in range(1000)] + [f"sub:mallory{n}" for n in range(1000)]
    path = folder / "threats.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


async def measure() -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="authz-bench-signals-"))
    shutil.copytree(REPO / "policies", folder / "policies")
    threats = _threat_file(folder)
    raw = check_request_from_json({"attributes": {
        "source": {"principal": "spiffe://example.org/frontend",
                   "address": {"socketAddress": {"address": "10.0.0.5", "portValue": 1000}}},
        "contextExtensions": {"service": "orders", "sensitivity": "medium"},
        "request": {"http": {"method": "GET", "path": "/orders/42", "headers": {}}}}}).SerializeToString()
    results: dict[str, float] = {}
    for name, signals in (("off", None), ("on", SignalsConfig.from_mapping({
            "rate": {"per_identity": {"rate": 1e9, "burst": 1e9}, "per_route": {"rate": 1e9, "burst": 1e9}},
            "threat_lists": [{"name": "feed", "path": str(threats)}]}))):
        app = build_app(Config(policies=str(folder / "policies"), addr="", metrics_addr="",
                               trust_domains=("example.org",), signals=signals))
        app.runtime.load()
        clock = [time.time()]  # a steady 100 requests per second: the identity's usual rate

        def tick() -> float:
            clock[0] += 0.01
            return clock[0]

        for _ in range(300):
            decision = await app.pipeline.decide(facts_from_check_request(parse_check_request(raw)), now=tick())
        assert decision.allowed, decision.reason

        async def rounds(count: int) -> float:
            facts = facts_from_check_request(parse_check_request(raw))
            started = time.perf_counter()
            for _ in range(count):
                await app.pipeline.decide(facts, now=tick())
            return (time.perf_counter() - started) / count * 1e6

        await rounds(500)
        results[name] = min([await rounds(5000) for _ in range(3)])
        await app.stop(0)
    results["added"] = results["on"] - results["off"]
    return results


def report(numbers: dict[str, Any]) -> str:
    return table("Signals, in-process (cached decision, default policy)", ["set-up", "µs per decision"], [
        ["signals off", f"{numbers['off']:.1f}"],
        ["all signals on (2 token buckets, anomaly, 10,000-entry threat list)", f"{numbers['on']:.1f}"],
        ["added by the signals", f"{numbers['added']:.1f}"]])


def run() -> tuple[dict[str, Any], str]:
    numbers = asyncio.run(measure())
    return numbers, report(numbers)
