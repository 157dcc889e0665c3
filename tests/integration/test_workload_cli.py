"""``authz-server identity serve --config FILE`` as a real process: its output, readiness,
SIGUSR1 rotation, clean SIGTERM, config errors, and CA keys that outlive a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from spiffe import WorkloadApiClient

from authz_server.mesh.processes import wait_until

A = "spiffe://example.org/a"


def write_config(tmp_path: Path, **overrides: object) -> Path:
    path = tmp_path / "identity.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": "state", "svid_ttl": "1h", "ready_file": "run/ready",
        "trust_domains": [{"name": "example.org"}],
        "workloads": [{"name": "a", "spiffe_id": A, "socket": "run/a.sock"},
                      {"name": "b", "spiffe_id": "spiffe://example.org/b", "socket": "run/b.sock"}],
        **overrides,
    }))
    return path


def start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "authz_server.cli", "identity", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def read_until_ready(proc: subprocess.Popen[str]) -> list[str]:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # blocks on the child's output; the child prints "ready" last
        lines.append(line.rstrip("\n"))
        if line.startswith("identity: ready"):
            return lines
    raise AssertionError(f"exited {proc.wait()} before ready: {lines} {proc.stderr.read() if proc.stderr else ''}")


def serial(tmp_path: Path) -> int:
    with WorkloadApiClient(f"unix:{tmp_path / 'run' / 'a.sock'}", default_timeout=5) as client:
        return client.fetch_x509_svid().leaf.serial_number


def test_serve_rotate_stop_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = start(config)
    try:
        lines = read_until_ready(proc)
        assert lines[0] == f"identity: a {A} on unix:{tmp_path / 'run' / 'a.sock'}"
        assert lines[1].startswith("identity: b spiffe://example.org/b on unix:")
        assert (tmp_path / "run" / "ready").exists()
        first = serial(tmp_path)
        ca_pem = sorted((tmp_path / "state" / "example.org").glob("*.ca.pem"))

        os.kill(proc.pid, signal.SIGUSR1)  # rotate every SVID now
        wait_until(lambda: serial(tmp_path) != first, timeout=10, what="a new SVID after SIGUSR1")

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None and "identity: stopped" in proc.stdout.read()
        assert not (tmp_path / "run" / "a.sock").exists() and not (tmp_path / "run" / "ready").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # a restart keeps the CA on disk
    proc = start(config)
    try:
        read_until_ready(proc)
        assert sorted((tmp_path / "state" / "example.org").glob("*.ca.pem")) == ca_pem
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_config_error_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, svid_ttl="forever")
    result = subprocess.run([sys.executable, "-m", "authz_server.cli", "identity", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: svid_ttl: expected a duration like '90s', '15m', '8h', got 'forever'"]


def test_a_socket_in_use_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    first = start(config)
    try:
        read_until_ready(first)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "authz_server.cli", "identity", "serve", "--config",
                                 str(config)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert "workloads[0].socket" in second.stderr and "another process" in second.stderr
        assert time.monotonic() - started < 30
        # the first one is unharmed: still serving, still announced as ready
        assert serial(tmp_path)
        assert (tmp_path / "run" / "ready").exists()
    finally:
        first.terminate()
        first.wait(timeout=10)
