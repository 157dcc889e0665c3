"""``file:PATH?max_bytes=100MB&keep=5``: one JSON record per line, rotated by size.

``PATH`` is the file being written; ``PATH.1`` is the newest rotated file and
``PATH.<keep-1>`` the oldest kept: at most ``keep`` files exist at any time (``keep=1``
keeps only the current file, starting it afresh when full). A file is rotated before a
line would take it past ``max_bytes``, so no file is larger than that unless a single
record is.

Several server processes may share one path: each batch is written under an exclusive
``flock`` on the folder, and a process that finds the file rotated by another reopens it.
Encoding and disk I/O run in a thread so neither a batch nor a slow disk stalls the event loop.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..record import AuditRecord
from .base import SinkUnavailable, in_worker_thread, parse_count, parse_size, split_options
from .stdout import write_all

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_KEEP = 5


class FileSink:
    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.name = f"file:{self.path}"
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self.cpu_seconds = 0.0

    @classmethod
    def from_spec(cls, spec: str) -> "FileSink":
        location, options = split_options(spec.removeprefix("file:"), {"max_bytes", "keep"}, key="audit")
        if not location:
            from ...errors import ConfigError

            raise ConfigError("file: sink needs a path, e.g. file:/var/log/authz.jsonl", key="audit")
        return cls(location,
                   max_bytes=parse_size(options["max_bytes"], key="audit: max_bytes")
                   if "max_bytes" in options else DEFAULT_MAX_BYTES,
                   keep=parse_count(options["keep"], key="audit: keep") if "keep" in options else DEFAULT_KEEP)

    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        try:
            await in_worker_thread(self, self._write_records, records)
        except OSError as exc:
            self._close_fd()
            raise SinkUnavailable(f"cannot write {self.path}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        self._close_fd()

    # -- in the writer thread (one batch at a time per sink)
    def _write_records(self, records: Sequence[AuditRecord]) -> None:
        self._write([record.encoded + b"\n" for record in records])

    def _write(self, lines: list[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            fd = self._current()
            size = os.fstat(fd).st_size
            pending: list[bytes] = []
            for line in lines:
                if size and size + len(line) > self.max_bytes:
                    write_all(fd, b"".join(pending))
                    pending.clear()
                    self._rotate()
                    fd = self._current()
                    size = 0
                pending.append(line)
                size += len(line)
            write_all(fd, b"".join(pending))
        finally:
            os.close(folder)  # releases the lock

    def _current(self) -> int:
        """The fd of ``path`` as it is now (another process may have rotated it)."""
        try:
            stat = self.path.stat()
            on_disk: tuple[int, int] | None = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            on_disk = None
        if self._fd is None or on_disk != self._inode:
            self._close_fd()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            stat = os.fstat(self._fd)
            self._inode = (stat.st_dev, stat.st_ino)
        return self._fd

    def _rotate(self) -> None:
        self._close_fd()
        oldest = self.keep - 1
        if oldest == 0:
            self.path.unlink(missing_ok=True)
            return
        Path(f"{self.path}.{oldest}").unlink(missing_ok=True)
        for index in range(oldest - 1, 0, -1):
            source = Path(f"{self.path}.{index}")
            if source.exists():
                source.rename(f"{self.path}.{index + 1}")
        self.path.rename(f"{self.path}.1")

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._inode = None


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The current file and its rotated predecessors, oldest first."""
    current = Path(path)
    pattern = re.compile(re.escape(current.name) + r"\.(\d+)")
    rotated = []
    if current.parent.is_dir():
        for entry in current.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match:
                rotated.append((int(match.group(1)), entry))
    files = [entry for _, entry in sorted(rotated, reverse=True)]
    if current.exists():
        files.append(current)
    return files


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every complete record in the current and rotated files, oldest file first. A line
    being written at this moment (no newline yet) or damaged is skipped."""
    for file in log_files(path):
        try:
            handle = file.open("rb")
        except FileNotFoundError:
            continue  # rotated away between listing and opening
        with handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
