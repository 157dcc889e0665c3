"""Start child processes, wait until they are ready by checking, and always tear them down.

Used by the demo mesh, the benchmarks and the end-to-end tests alike. Every child runs in
its own process group so a stop takes its children too; output goes to a log file per
process, never to our terminal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


class ProcessFailed(RuntimeError):
    """A child exited or never became ready; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tcp_ready(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            return False

    return check


def unix_ready(path: str | os.PathLike[str]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
                sock.settimeout(0.2)
                sock.connect(os.fspath(path))
                return True
        except OSError:
            return False

    return check


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.02,
               what: str = "condition", alive: Callable[[], None] | None = None) -> None:
    """Poll ``check`` until it holds; ``alive`` may raise to abort early (child died)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ensure_running(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ProcessFailed(f"{self.name} exited with code {code}; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        self.signal(signal.SIGTERM)
        self.reap(time.monotonic() + timeout)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group, if it is still running."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)

    def reap(self, deadline: float) -> None:
        """Wait for the child until ``deadline`` (monotonic), then kill its group and wait for that."""
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5.0)


@dataclass
class Supervisor:
    """Owns a set of children; ``close()`` (or leaving the ``with``) stops them in reverse order."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], *, ready: Callable[[], bool] | None = None,
              timeout: float = 20.0, env: dict[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})}, cwd=cwd,
            )
        finally:
            log.close()
        child = Child(name, popen, log_path)
        self.children.append(child)
        if ready is not None:
            try:
                wait_until(ready, timeout=timeout, what=f"{name} to become ready", alive=child.ensure_running)
            except TimeoutError as exc:
                raise ProcessFailed(f"{exc}; log {log_path}:\n{child.log_tail()}") from None
        return child

    def close(self, timeout: float = 5.0) -> None:
        """Stop every child: all are asked at once and share one deadline, so closing N children
        takes as long as the slowest, not the sum (a busy machine can make each one slow)."""
        stopping = self.children[::-1]
        self.children.clear()
        for child in stopping:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in stopping:
            child.reap(deadline)

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
