"""Three authz-server replicas behind one real Envoy, under load: a rolling restart fails no
request; a replica killed with SIGKILL fails at most the checks it had in flight."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy
from authz_server.mesh.processes import Supervisor, wait_until
from tests.support.fleet import Load, host_stats, start_replicas, wait_healthy

pytestmark = pytest.mark.e2e

CONNECTIONS = 12


def test_rolling_restart_fails_nothing_and_a_kill_fails_at_most_what_was_in_flight(
        supervisor: Supervisor, tmp_path: Path) -> None:
    replicas = start_replicas(supervisor, tmp_path, 3)
    addresses = [r.address for r in replicas]
    envoy = start_envoy(supervisor, "front", render_front_proxy(FrontProxy(
        # A timeout this machine's load alone cannot reach: what fails here fails because of a restart.
        authz=AuthzTarget(addresses[0], replicas=tuple(addresses[1:]), timeout="2s"),
        routes=(Route("/", direct_response="ok"),))),
        concurrency=2)
    wait_healthy(envoy.admin_url, addresses)
    with Load(envoy.port("ingress"), connections=CONNECTIONS) as load:
        wait_until(lambda: load.total() > 300, timeout=60, what="the load to get going")

        drains = []
        for replica in replicas:
            load.phase = f"restart {replica.name}"
            drains.append(replica.terminate())
            replica.start()
            wait_healthy(envoy.admin_url, addresses)
            time.sleep(0.5)  # some traffic on the whole fleet again before the next one goes

        load.phase = "before the kill"
        time.sleep(1.0)
        victim = replicas[1]
        in_flight = int(host_stats(envoy.admin_url)[victim.address]["rq_active"])
        load.phase = "kill"
        victim.kill()
        time.sleep(3.0)
        load.phase = "after"
        time.sleep(1.0)

    for phase, tally in load.tallies.items():
        print(f"{phase}: {tally.sent} sent, {tally.allowed} allowed, {tally.denied} denied, {tally.failed} failed "
              f"{dict(tally.failures)}, {tally.wrongly_allowed} allowed wrongly")
    print(f"drain (SIGTERM to exit) took {', '.join(f'{d:.1f}s' for d in drains)}; "
          f"{in_flight} checks in flight on {victim.name} when it was killed")
    retried = envoy.stats("cluster.authz.upstream_rq_retry").get("cluster.authz.upstream_rq_retry", 0)
    print(f"checks Envoy retried on another replica: {retried}")

    restarts = [t for phase, t in load.tallies.items() if phase.startswith("restart")]
    assert len(restarts) == 3 and all(t.sent > 50 for t in restarts), "each restart should happen under load"
    assert sum(t.failed for t in restarts) == 0, "the rolling restart failed requests"
    assert all(t.wrongly_allowed == 0 for t in load.tallies.values()), "a denied path was allowed"
    kill = load.tallies["kill"]
    assert kill.sent > 50
    # Each client has one request in flight at most, so no replica ever has more than CONNECTIONS.
    assert kill.failed <= max(in_flight, CONNECTIONS), kill.failures
    assert load.tallies["after"].failed == 0 and load.tallies["after"].allowed > 0
