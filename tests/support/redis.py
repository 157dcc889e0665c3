"""A private redis-server per test (never the machine's shared one), stoppable and restartable."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from authz_server.mesh.processes import Child, Supervisor, free_port, tcp_ready


@dataclass
class RedisServer:
    supervisor: Supervisor
    port: int
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.child = self.supervisor.start(
            f"redis-{self.port}",
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.supervisor.log_dir)],
            ready=tcp_ready("127.0.0.1", self.port), timeout=10,
        )
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.supervisor.children.remove(self.child)
            self.child = None


def start_redis(supervisor: Supervisor, log_dir: Path | None = None) -> RedisServer:
    return RedisServer(supervisor, free_port()).start()
