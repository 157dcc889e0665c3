"""Issue 26's failure figures (docs/scaling.md): what losing a part of the fleet costs.

* The store: kill the Sentinel group's primary, and separately the Cluster shard that carries
  the revocation feed, under sign-ins, session calls and revocations on three replicas
  (tests/support/failover.py accounts for every request).
* authz-server itself: three replicas behind one real Envoy under load, restarted one by
  one (SIGTERM: drain), then one killed with SIGKILL (tests/support/fleet.py).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from authz_server.identity.redis_store import CHANNEL
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy
from authz_server.mesh.processes import Supervisor, wait_until
from tests.support.failover import FailoverReport, failover_under_traffic
from tests.support.fleet import Load, host_stats, start_replicas, wait_healthy
from tests.support.redis import ClusterGroup, SentinelGroup

from .harness import table


def store_failovers(folder: Path) -> dict[str, FailoverReport]:
    # Each queued revocation and lost feed is a warning in production; here they are the point.
    logging.getLogger("authz_server").setLevel(logging.ERROR)
    reports = {}
    with Supervisor(folder / "sentinel") as supervisor:
        group = SentinelGroup(supervisor).start()
        reports["Sentinel: primary killed"] = asyncio.run(failover_under_traffic(group.url, group.primary().kill))
    with Supervisor(folder / "cluster") as supervisor:
        cluster = ClusterGroup(supervisor).start()
        owner = cluster.owner_of(CHANNEL)
        reports["Cluster: the feed's shard killed"] = asyncio.run(failover_under_traffic(cluster.url, owner.kill))
    return reports


def fleet(folder: Path, connections: int = 12) -> dict[str, Any]:
    with Supervisor(folder / "fleet") as supervisor:
        replicas = start_replicas(supervisor, folder, 3)
        addresses = [r.address for r in replicas]
        envoy = start_envoy(supervisor, "front", render_front_proxy(FrontProxy(
            authz=AuthzTarget(addresses[0], replicas=tuple(addresses[1:]), timeout="2s"),
            routes=(Route("/", direct_response="ok"),))), concurrency=2)
        wait_healthy(envoy.admin_url, addresses)
        with Load(envoy.port("ingress"), connections=connections) as load:
            wait_until(lambda: load.total() > 300, timeout=60, what="the load to get going")
            drains = []
            load.phase = "rolling restart"
            for replica in replicas:
                drains.append(replica.terminate())
                replica.start()
                wait_healthy(envoy.admin_url, addresses)
                time.sleep(0.5)
            load.phase = "steady"
            time.sleep(1.0)
            in_flight = int(host_stats(envoy.admin_url)[replicas[1].address]["rq_active"])
            load.phase = "SIGKILL of one replica (+3 s)"
            replicas[1].kill()
            time.sleep(3.0)
        retries = envoy.stats("cluster.authz.upstream_rq_retry").get("cluster.authz.upstream_rq_retry", 0)
    return {"tallies": load.tallies, "drain_s": drains, "in_flight_at_kill": in_flight, "retries": retries,
            "connections": connections}


def report(stores: dict[str, FailoverReport], fleet_result: dict[str, Any]) -> str:
    names = list(stores)
    first = next(iter(stores.values()))
    rows = [[what, *(dict(r.lines())[what] for r in stores.values())] for what, _ in first.lines()]
    parts = [table("Store failover under traffic (3 replicas; sign-ins every 10 ms, session calls, a revocation "
                   "every 100 ms)", ["", *names], rows)]
    tallies = fleet_result["tallies"]
    parts.append(table(
        f"Three replicas behind Envoy, {fleet_result['connections']} clients (every request a fresh path)",
        ["phase", "requests", "allowed", "denied (policy)", "failed", "allowed wrongly"],
        [[phase, t.sent, t.allowed, t.denied, t.failed, t.wrongly_allowed] for phase, t in tallies.items()
         if phase != "warm-up"]))
    parts.append(f"\ndrain (SIGTERM to exit): {', '.join(f'{d:.1f}s' for d in fleet_result['drain_s'])}; "
                 f"checks in flight on the killed replica: {fleet_result['in_flight_at_kill']} (at most "
                 f"{fleet_result['connections']}); checks Envoy retried on another replica: {fleet_result['retries']}")
    return "\n".join(parts)


def run() -> tuple[dict[str, Any], str]:
    folder = Path(tempfile.mkdtemp(prefix="authz-bench-scaling-"))
    stores = store_failovers(folder)
    fleet_result = fleet(folder)
    raw = {"stores": {name: {**vars(r), "max_lag_ms": r.max_lag_ms} for name, r in stores.items()},
           "fleet": {**fleet_result, "tallies": {p: vars(t) for p, t in fleet_result["tallies"].items()}}}
    return raw, report(stores, fleet_result)
