"""Private redis-servers per test (never the machine's shared one): one server, a primary with
replicas watched by Sentinel, or a Cluster. Every process is stoppable, killable and restartable.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from authz_server.mesh.processes import Child, Supervisor, free_port, tcp_ready, wait_until

SENTINEL_SERVICE = "authz"


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    return binary


def command(port: int, *args: str | int, timeout: float = 2.0) -> str:
    """One command through redis-cli (its reply as text): for test plumbing, not for the code under test."""
    done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    return done.stdout.strip()


def info(port: int, section: str) -> dict[str, str]:
    try:
        text = command(port, "INFO", section)
    except subprocess.TimeoutExpired:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


@dataclass
class RedisServer:
    supervisor: Supervisor
    port: int
    child: Child | None = None
    extra: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def name(self) -> str:
        return f"redis-{self.port}"

    def start(self) -> "RedisServer":
        self.child = self.supervisor.start(
            self.name,
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.supervisor.log_dir), "--dbfilename", f"dump-{self.port}.rdb", *self.extra],
            ready=tcp_ready("127.0.0.1", self.port), timeout=10,
        )
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.supervisor.children.remove(self.child)
            self.child = None

    def kill(self) -> None:
        """SIGKILL: the process dies with whatever it had not replicated yet."""
        if self.child is not None:
            self.child.popen.send_signal(signal.SIGKILL)
            self.child.popen.wait(10)
            self.supervisor.children.remove(self.child)
            self.child = None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.popen.poll() is None


def start_redis(supervisor: Supervisor, log_dir: Path | None = None) -> RedisServer:
    return RedisServer(supervisor, free_port()).start()


# -- Sentinel ---------------------------------------------------------------------------------

@dataclass
class SentinelGroup:
    """A primary, its replicas and three sentinels watching them (quorum 2), failing over
    about a second after the primary stops answering."""

    supervisor: Supervisor
    servers: list[RedisServer] = field(default_factory=list)
    sentinels: list[int] = field(default_factory=list)
    down_after_ms: int = 1000

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}/0"

    def start(self, replicas: int = 2, sentinels: int = 3) -> "SentinelGroup":
        primary = RedisServer(self.supervisor, free_port()).start()
        self.servers.append(primary)
        for _ in range(replicas):
            self.servers.append(RedisServer(self.supervisor, free_port(),
                                            extra=("--replicaof", "127.0.0.1", str(primary.port))).start())
        for _ in range(sentinels):
            port = free_port()
            conf = self.supervisor.log_dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.supervisor.log_dir}\n"
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SENTINEL_SERVICE} 4000\n"
                f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n")
            self.supervisor.start(f"sentinel-{port}", [redis_binary(), str(conf), "--sentinel"],
                                  ready=tcp_ready("127.0.0.1", port), timeout=10)
            self.sentinels.append(port)
        wait_until(self._settled, timeout=60, interval=0.1, what="sentinels to see every replica and each other")
        return self

    def _settled(self) -> bool:
        primary = self.primary_port()
        if primary is None:
            return False
        replicas = [s for s in self.servers if s.running and s.port != primary]
        if any(info(s.port, "replication").get("master_link_status") != "up" for s in replicas):
            return False
        for port in self.sentinels:
            seen = _flagged(command(port, "SENTINEL", "replicas", SENTINEL_SERVICE), "slave")
            others = _flagged(command(port, "SENTINEL", "sentinels", SENTINEL_SERVICE), "sentinel")
            if seen < len(replicas) or others < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self) -> int | None:
        """What the sentinels agree the primary is (None while they disagree or know none)."""
        answers = set()
        for port in self.sentinels:
            reply = command(port, "SENTINEL", "get-master-addr-by-name", SENTINEL_SERVICE).split()
            answers.add(int(reply[1]) if len(reply) == 2 else None)
        return answers.pop() if len(answers) == 1 else None

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def primary(self) -> RedisServer:
        port = self.primary_port()
        assert port is not None, "the sentinels do not agree on a primary"
        return self.server(port)

    def wait_for_new_primary(self, old: int, timeout: float = 30.0) -> int:
        wait_until(lambda: self.primary_port() not in (None, old)
                   and info(self.primary_port() or 0, "replication").get("role") == "master",
                   timeout=timeout, interval=0.05, what="the sentinels to promote a replica")
        port = self.primary_port()
        assert port is not None
        return port


def _flagged(reply: str, flags: str) -> int:
    """How many entries of a SENTINEL replicas/sentinels reply (flat name/value lines) have
    exactly these flags (no s_down, no disconnected)."""
    lines = reply.splitlines()
    return sum(1 for name, value in zip(lines, lines[1:]) if name == "flags" and value == flags)


# -- Cluster ----------------------------------------------------------------------------------

@dataclass
class ClusterGroup:
    """A Redis Cluster of ``primaries`` shards, each with ``replicas`` replicas."""

    supervisor: Supervisor
    servers: list[RedisServer] = field(default_factory=list)
    node_timeout_ms: int = 1000

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:3])
        return f"redis+cluster://{hosts}/"

    def start(self, primaries: int = 3, replicas: int = 1) -> "ClusterGroup":
        for _ in range(primaries * (1 + replicas)):
            port = free_port()
            self.servers.append(RedisServer(self.supervisor, port, extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-replica-validity-factor", "0"
            )).start())
        done = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers),
                               "--cluster-replicas", str(replicas), "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        wait_until(self._settled, timeout=60, interval=0.1, what="every cluster node to report cluster_state:ok")
        return self

    def _settled(self) -> bool:
        for server in self.servers:
            if not server.running:
                continue
            state = command(server.port, "CLUSTER", "INFO")
            if "cluster_state:ok" not in state:
                return False
        replicas = [s for s in self.servers if s.running and info(s.port, "replication").get("role") == "slave"]
        return all(info(s.port, "replication").get("master_link_status") == "up" for s in replicas)

    def owner_of(self, key: str) -> RedisServer:
        """The primary serving ``key``'s slot right now."""
        slot = int(command(self.servers[0].port, "CLUSTER", "KEYSLOT", key))
        for server in self.servers:
            if server.running and info(server.port, "replication").get("role") == "master":
                for line in command(server.port, "CLUSTER", "NODES").splitlines():
                    parts = line.split()
                    if "myself" in parts[2]:
                        for span in parts[8:]:
                            low, _, high = span.partition("-")
                            if low.isdigit() and int(low) <= slot <= int(high or low):
                                return server
        raise LookupError(f"no primary serves slot {slot}")

    def wait_settled(self, timeout: float = 30.0) -> None:
        wait_until(self._settled, timeout=timeout, interval=0.05, what="the cluster to settle")
