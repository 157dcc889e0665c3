"""``stdout``: one JSON record per line on standard output (for a log collector).

Lines are written in chunks of at most ``PIPE_BUF`` bytes cut at line ends, so when
several worker processes share one pipe their lines never interleave mid-line (POSIX makes
pipe writes up to ``PIPE_BUF`` atomic); a single line longer than that is written alone.
Encoding and writes happen in a thread: neither a batch nor a slow reader stalls the event loop.
"""

from __future__ import annotations

import os
import select
from typing import Sequence

from ..record import AuditRecord
from .base import SinkUnavailable, in_worker_thread

PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


def line_chunks(lines: Sequence[bytes], limit: int = PIPE_BUF) -> list[bytes]:
    """``lines`` (encoded, without their ends) each ended, in chunks of at most ``limit`` bytes."""
    chunks: list[bytes] = []
    current = bytearray()
    for line in lines:
        data = line + b"\n"
        if current and len(current) + len(data) > limit:
            chunks.append(bytes(current))
            current.clear()
        current += data
    if current:
        chunks.append(bytes(current))
    return chunks


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class StdoutSink:
    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.name = "stdout" if fd == 1 else f"fd:{fd}"
        self.cpu_seconds = 0.0

    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        try:
            await in_worker_thread(self, self._write_records, records)
        except OSError as exc:
            raise SinkUnavailable(f"cannot write to {self.name}: {exc.strerror or exc}") from None

    def _write_records(self, records: Sequence[AuditRecord]) -> None:
        for chunk in line_chunks([record.encoded for record in records]):
            write_all(self.fd, chunk)

    async def close(self) -> None:
        return None  # standard output belongs to the process, not to the sink
