"""Run authz-server in the test's own event loop (real gRPC on loopback, real policy engine)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

from authz_server.config import Config
from authz_server.server import App, build_app

REPO = Path(__file__).resolve().parents[2]
TUTORIAL_POLICY = REPO / "tests" / "vectors" / "opa_envoy" / "tutorial"


def copy_policies(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


@contextlib.asynccontextmanager
async def running_app(config: Config) -> AsyncIterator[App]:
    app = build_app(replace(config, addr=config.addr or "127.0.0.1:0", metrics_addr=config.metrics_addr))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(0)


def write_policy(folder: Path, source: str, name: str = "policy.rego") -> None:
    """Replace a policy file in one step, so a poller never reads half of it."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_text(source)
    tmp.replace(folder / name)


class ServerThread:
    """An event loop in its own thread, for servers that synchronous tests (hypothesis) call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="authz-test-server", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
