"""Several authz-server replicas behind one real Envoy, and a load that accounts for every request.

The load runs on its own thread and event loop (the test's thread blocks while it restarts
replicas). Every request has a fresh id in its path, so nothing is answered from a cache:
``/ok/<n>`` must come back 200, ``/no/<n>`` must come back 403 carrying authz-server's
``x-authz-decision-id`` (the policy denied it). A 403 without it is Envoy's own answer
when the check failed (``status_on_error``): a failed request. A 200 for ``/no`` would be
a request allowed wrongly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from authz_server.mesh.processes import Child, Supervisor, free_port, wait_until

POLICY = """package envoy.authz
import rego.v1

default allow := false

allow if input.parsed_path[0] == "ok"
"""


@dataclass
class Replica:
    supervisor: Supervisor
    name: str
    config: Path
    port: int
    child: Child | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Replica":
        ready = self.supervisor.log_dir / f"{self.name}.ready.json"
        ready.unlink(missing_ok=True)
        self.child = self.supervisor.start(
            self.name, [sys.executable, "-m", "authz_server.cli", "serve", "--config", str(self.config),
                        "--addr", self.address, "--workers", "1", "--ready-file", str(ready)],
            ready=ready.exists, timeout=60)
        return self

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait for the exit (the drain); returns how long it took."""
        assert self.child is not None
        started = time.monotonic()
        self.child.popen.send_signal(signal.SIGTERM)
        self.child.popen.wait(timeout)
        self._forget()
        return time.monotonic() - started

    def kill(self) -> None:
        assert self.child is not None
        self.child.popen.send_signal(signal.SIGKILL)
        self.child.popen.wait(10)
        self._forget()

    def _forget(self) -> None:
        assert self.child is not None
        self.supervisor.children.remove(self.child)
        self.child = None


def start_replicas(supervisor: Supervisor, folder: Path, count: int, *, drain_delay: str = "2s") -> list[Replica]:
    policies = folder / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    (policies / "policy.rego").write_text(POLICY)
    config = folder / "replica.yaml"
    config.write_text(json.dumps({"policies": str(policies), "metrics_addr": "", "log_level": "warning",
                                  "shutdown": {"drain_delay": drain_delay, "grace": "10s"}}))
    return [Replica(supervisor, f"authz-{i}", config, free_port()).start() for i in range(count)]


def host_stats(admin_url: str, cluster: str = "authz") -> dict[str, dict[str, str]]:
    """Envoy's /clusters, per host of ``cluster``: stat or flag name → value."""
    with urllib.request.urlopen(f"{admin_url}/clusters", timeout=2) as answer:  # noqa: S310 - loopback admin
        text = answer.read().decode()
    hosts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster:
            hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


def wait_healthy(admin_url: str, addresses: list[str], timeout: float = 30.0) -> None:
    def healthy() -> bool:
        hosts = host_stats(admin_url)
        return all(hosts.get(a, {}).get("health_flags") == "healthy" for a in addresses)

    wait_until(healthy, timeout=timeout, interval=0.05, what=f"Envoy to see {addresses} healthy")


@dataclass
class Tally:
    sent: int = 0
    allowed: int = 0
    denied: int = 0
    failed: int = 0
    wrongly_allowed: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # what failed requests got


class Load:
    """``connections`` clients sending one request after another through Envoy's listener."""

    def __init__(self, port: int, *, connections: int = 12) -> None:
        self.port = port
        self.connections = connections
        self.phase = "warm-up"
        self.tallies: dict[str, Tally] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)
        self._counter = 0

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def tally(self, phase: str) -> Tally:
        return self.tallies.setdefault(phase, Tally())

    def total(self) -> int:
        return sum(t.sent for t in self.tallies.values())

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", limits=limits, timeout=10) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.connections)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            self._counter += 1
            should_allow = self._counter % 2 == 0
            tally = self.tally(self.phase)
            tally.sent += 1
            try:
                answer = await client.get(f"/{'ok' if should_allow else 'no'}/{self._counter}")
            except httpx.HTTPError as exc:
                tally.failed += 1
                tally.failures[type(exc).__name__] += 1
                continue
            decided = "x-authz-decision-id" in answer.headers
            if answer.status_code == 200:
                if should_allow:
                    tally.allowed += 1
                else:
                    tally.wrongly_allowed += 1
            elif answer.status_code == 403 and decided and not should_allow:
                tally.denied += 1
            else:
                tally.failed += 1
                tally.failures[f"{answer.status_code}{'' if decided else ' (check failed)'}"] += 1
