"""The supervisor stops its children together: one slow child does not hold up the stop of the others."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from authz_server.mesh.processes import Supervisor, wait_until

# On SIGTERM: leave a mark, then linger until released (a child busy draining), then exit.
LINGERING_CHILD = """
import pathlib, signal, sys, time
marks = pathlib.Path(sys.argv[1])
def on_term(*_):
    (marks / f"term-{sys.argv[2]}").touch()
    while not (marks / "release").exists():
        time.sleep(0.02)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(marks / f"up-{sys.argv[2]}").touch()
while True:
    time.sleep(1)
"""

# Ignores SIGTERM altogether: only the kill after the deadline ends it.
DEAF_CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"


def test_every_child_is_asked_to_stop_before_any_is_waited_for(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path / "logs")
    for n in range(3):
        supervisor.start(f"child-{n}", [sys.executable, "-c", LINGERING_CHILD, str(tmp_path), str(n)],
                         ready=(tmp_path / f"up-{n}").exists)
    children = list(supervisor.children)
    closing = threading.Thread(target=supervisor.close, kwargs={"timeout": 120})
    closing.start()
    try:
        # One at a time, the second child would only hear of the stop once the first had exited.
        wait_until(lambda: all((tmp_path / f"term-{n}").exists() for n in range(3)), timeout=60,
                   what="every child to receive SIGTERM while all of them still linger")
        assert all(child.popen.poll() is None for child in children)
    finally:
        (tmp_path / "release").touch()
        closing.join(timeout=120)
    assert not closing.is_alive()
    assert [child.popen.returncode for child in children] == [0, 0, 0]
    assert supervisor.children == []


def test_a_child_deaf_to_sigterm_is_killed_after_the_deadline(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path / "logs")
    log = tmp_path / "logs" / "deaf.log"
    child = supervisor.start("deaf", [sys.executable, "-c", DEAF_CHILD],
                             ready=lambda: log.exists() and "up" in log.read_text())
    supervisor.close(timeout=0.5)
    assert child.popen.returncode is not None and child.popen.returncode < 0  # killed by a signal
