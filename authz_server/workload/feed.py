"""What one socket serves: a workload's latest snapshot, and a way to wait for the next one.

Both APIs on a socket (Workload API and SDS) read the same ``WorkloadFeed``; the server
``publish``-es a new snapshot after every rotation that concerns the workload, and every
open stream wakes up and pushes. Runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

from .issuer import Issuer, WorkloadSnapshot
from .svid import JwtSvid, ValidatedJwtSvid


class WorkloadFeed:
    def __init__(self, issuer: Issuer, workload: str, *, clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self.workload = issuer.workloads[workload]
        self._clock = clock
        self._snapshot = issuer.snapshot(workload)
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def snapshot(self) -> WorkloadSnapshot:
        return self._snapshot

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self) -> None:
        """Take the issuer's current snapshot and wake every waiting stream."""
        self._snapshot = self.issuer.snapshot(self.workload.name)
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def close(self) -> None:
        """Wake every waiting stream for good (server shutdown)."""
        self._closed = True
        self._changed.set()

    async def next(self, after_version: int) -> WorkloadSnapshot | None:
        """The first snapshot newer than ``after_version``; ``None`` once the feed is closed."""
        while not self._closed and self._snapshot.version <= after_version:
            await self._changed.wait()
        return None if self._closed else self._snapshot

    def jwt_svid(self, audience: Iterable[str]) -> JwtSvid:
        return self.issuer.issue_jwt_svid(self.workload.name, audience, now=self._clock())

    def validate_jwt_svid(self, token: str, audience: str) -> ValidatedJwtSvid:
        return self.issuer.validate_jwt_svid(self.workload.name, token, audience, now=self._clock())
