"""The demo mesh end to end: the tour's every step as promised, and nothing left running after."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authz_server.mesh.demo import mesh_demo
from authz_server.mesh.launcher import MeshOptions


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (the demo's workdir is in every child's argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if text in argv and state != "Z":
            found.append(f"{entry.name}: {argv[:200]}")
    return found


def stacks_of(pid: int) -> str:
    """Where each thread of a live Python process is (py-spy, a dev dependency), or why that is unknown."""
    try:
        dump = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "dump", "--pid", str(pid)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy could not tell: {exc})"
    return dump.stdout + dump.stderr


async def test_the_tour_turns_out_as_it_says_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = io.StringIO()
    started = time.perf_counter()
    code = await mesh_demo(MeshOptions(tmp_path / "mesh"), keep=False, out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "✘" not in text and "all 10 steps turned out as the tour said" in text, text
    for promise in ("frontend calls payments directly: denied", "a replayed token from another client: refused",
                    "an SVID rotation passes unnoticed"):
        assert promise in text
    assert time.perf_counter() - started < 120
    assert processes_mentioning(str(tmp_path / "mesh")) == []


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    workdir = tmp_path / "kept"
    demo = subprocess.Popen([sys.executable, "-m", "authz_server.cli", "demo", "--keep", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert demo.stdout is not None
    seen = []
    try:
        for line in demo.stdout:  # readiness: the demo prints the commands to try once the tour is done
            seen.append(line)
            if "The mesh keeps running" in line:
                break
        else:
            pytest.fail("the demo ended before it was ready:\n" + "".join(seen))
        assert len(processes_mentioning(str(workdir))) >= 4  # authz-server and three Envoys at least
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the demo still ran 30 s after Ctrl-C; its threads were at:\n" + stacks_of(demo.pid))
        assert code == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    assert processes_mentioning(str(workdir)) == []
