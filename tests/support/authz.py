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
    """The app of ``config``, started; the default ports become free ones, so suites that run
    side by side never meet on 9191 or 9464."""
    defaults = Config()
    addr = "127.0.0.1:0" if config.addr in ("", defaults.addr) else config.addr
    metrics = "127.0.0.1:0" if config.metrics_addr == defaults.metrics_addr else config.metrics_addr
    app = build_app(replace(config, addr=addr, metrics_addr=metrics))
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
