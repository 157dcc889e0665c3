"""A bounded soak on loopback (issue 23): legit clients keep asking the HTTP front while 200
hostile connections attack it (slowloris, smuggling, oversize heads and bodies, JSON nested
900 deep), from a process of their own. Every legit request is answered, and answered right,
and in good time; each attack meets its defence; the server's memory stays bounded; the audit
log records every legit decision, during the attack too.

The time bound is generous on purpose (a busy 2-core machine is slow, never fast): the target
of issue 23 (p99 within twice the quiet p99) is measured by ``make bench`` (tests/bench/hostile.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import yaml

from authz_server.evaluate.load import rss_mb
from authz_server.mesh.processes import Supervisor
from tests.support.authz import write_policy
from tests.support.hostile import legit_load

POLICY = "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.parsed_path[0] == \"public\"\n"
RATE = 100  # legit requests a second
GENEROUS = 5.0  # seconds: no legit request may take longer, however busy the machine


async def test_legit_clients_are_answered_right_and_in_time_under_200_hostile_connections(
        supervisor: Supervisor, tmp_path: Path) -> None:
    write_policy(tmp_path / "policies", POLICY)
    config, ready, audit = tmp_path / "config.yaml", tmp_path / "ready.json", tmp_path / "audit.jsonl"
    config.write_text(yaml.safe_dump({"addr": "", "http_addr": "127.0.0.1:0", "metrics_addr": "",
                                      "policies": str(tmp_path / "policies"), "limits": {"header_timeout": "2s"},
                                      "audit": [f"file:{audit}"]}))
    server = supervisor.start("authz", [sys.executable, "-m", "authz_server.cli", "serve", "--config", str(config),
                                        "--workers", "1", "--ready-file", str(ready)], ready=ready.exists, timeout=60)
    address = json.loads(ready.read_text())["http_addr"]

    quiet = await legit_load(address, 4, rate=RATE)
    rss_before = rss_mb(server.popen.pid)
    hostile = subprocess.Popen([sys.executable, "-m", "tests.support.hostile", "hostile", address, "14", "200"],
                               stdout=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(2)  # the attacks are under way
        loaded = await legit_load(address, 10, rate=RATE, first=1_000_000)
        rss_during = rss_mb(server.popen.pid)
        out, _ = await asyncio.to_thread(hostile.communicate, timeout=120)
    finally:
        if hostile.poll() is None:
            hostile.kill()
    outcomes = json.loads(out)
    server.ensure_running()

    for result, seconds in ((quiet, 4), (loaded, 10)):
        assert result.wrong == [], result.wrong[:5]
        assert len(result.latencies) >= RATE * seconds * 0.9  # every request the clients sent was answered
        assert max(result.latencies) < GENEROUS, max(result.latencies)
    print(f"\nlegit p99: quiet {quiet.percentile(0.99) * 1e3:.1f} ms, "
          f"under attack {loaded.percentile(0.99) * 1e3:.1f} ms; server RSS {rss_before:.0f} -> {rss_during:.0f} MB; "
          f"attacks: {outcomes}")
    defences = {"slowloris": {"408"}, "smuggling": {"400"}, "oversize": {"413", "431"}, "deep_json": {"403"}}
    for outcome, times in outcomes.items():
        kind, _, what = outcome.partition(": ")
        assert what in defences[kind], f"{outcome} ({times} times)"
    assert all(any(o.startswith(kind) for o in outcomes) for kind in defences), outcomes
    assert rss_during - rss_before < 100, (rss_before, rss_during)  # bounded: no per-connection pile-up

    legit = len(quiet.latencies) + len(loaded.latencies)
    server.stop()  # SIGTERM: the audit log is flushed before the process exits
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    decided = [r for r in records if "/item-" in r.get("input", {}).get("attributes", {}).get("request", {})
               .get("http", {}).get("path", "")]
    assert len(decided) >= legit, (len(decided), legit)  # the attack silenced nothing
