"""Hot reload: the folder watcher picks up a change (within a second on a quiet machine),
whether it polls the folder on the event loop (small folders) or on a thread (folders slow
to poll)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from authz_server.policy import loader
from authz_server.policy.loader import PolicyRuntime
from tests.support.authz import write_policy

ALLOW = "package envoy.authz\nimport rego.v1\nallow := true\n"
DENY = "package envoy.authz\nimport rego.v1\nallow := false\n"


@pytest.mark.parametrize("slow_poll", [False, True], ids=["polled on the loop", "polled on a thread"])
async def test_a_change_is_picked_up_and_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   slow_poll: bool) -> None:
    # every poll counts as slow, or none does, whatever the machine's load makes of the clock
    monkeypatch.setattr(loader, "INLINE_POLL_SECONDS", 0.0 if slow_poll else 3600.0)
    polled_on: list[threading.Thread] = []
    first_poll = asyncio.Event()
    loop = asyncio.get_running_loop()

    real_snapshot = loader.snapshot

    def counting_snapshot(root: str) -> object:
        polled_on.append(threading.current_thread())
        loop.call_soon_threadsafe(first_poll.set)
        return real_snapshot(root)

    write_policy(tmp_path, ALLOW)
    runtime = PolicyRuntime(str(tmp_path), isolation="inline")
    runtime.load()
    monkeypatch.setattr(loader, "snapshot", counting_snapshot)
    assert runtime.active is not None
    first = runtime.active.version
    changed = asyncio.Event()
    runtime.listeners.append(lambda _runtime: changed.set())
    watcher = asyncio.create_task(runtime.watch(interval=0.05))
    try:
        await asyncio.wait_for(first_poll.wait(), 5)
        write_policy(tmp_path, DENY)
        await asyncio.wait_for(changed.wait(), 60)  # a second on a quiet machine; a busy one gets a minute
        assert runtime.active.version != first
        # polled_on[0]: the first poll (always on the loop); [1]: the poll that saw the change
        # (then reload() takes its own snapshot, on a thread).
        assert (polled_on[1] is threading.main_thread()) is not slow_poll
    finally:
        watcher.cancel()
        runtime.close()
