"""A PostgreSQL server of the test run's own, on a free loopback port.

The machine may run a PostgreSQL of its own (on 5432); tests never touch it. The first test
that asks starts a private cluster (``initdb`` into a temporary folder, trust authentication,
a ``test`` database) and every later one shares it; it stops when the run ends.
``AUTHZ_TEST_POSTGRES`` names another server to use instead (CI elsewhere, a container).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from authz_server.mesh.processes import free_port, tcp_ready, wait_until

_lock = threading.Lock()
_url: str | None = None


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def available() -> bool:
    return bool(os.environ.get("AUTHZ_TEST_POSTGRES")) or (_binary("initdb") is not None and
                                                           _binary("postgres") is not None)


def postgres_url() -> str:
    """``postgresql://postgres@127.0.0.1:PORT/test`` of the private server, started on first use."""
    global _url
    with _lock:
        if _url is None:
            _url = os.environ.get("AUTHZ_TEST_POSTGRES") or _start()
        return _url


def _start() -> str:
    initdb, postgres = _binary("initdb"), _binary("postgres")
    if initdb is None or postgres is None:
        raise RuntimeError("PostgreSQL's initdb and postgres are not installed (Debian: postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="authz-test-pg-"))
    data = folder / "data"
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses to run as root
    if user:
        shutil.chown(folder, "postgres")
    subprocess.run([*user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    server = subprocess.Popen([*user, postgres, "-D", str(data), "-p", str(port), "-k", str(folder),
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    wait_until(tcp_ready("127.0.0.1", port), timeout=60, what=f"the test PostgreSQL on port {port}")
    createdb = _binary("createdb")
    assert createdb is not None
    for _ in range(100):  # accepting TCP a moment before it accepts sessions
        done = subprocess.run([*user, createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "test"],
                              capture_output=True, timeout=60)
        if done.returncode == 0:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"could not create the test database: {done.stderr.decode(errors='replace')}")
    return f"postgresql://postgres@127.0.0.1:{port}/test"
