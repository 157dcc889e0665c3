"""Rotation on schedule: sleep until the issuer's next event, advance it, push what changed.

The issuer decides what is due (an SVID at half its lifetime, a CA published at half its
lifetime and activated ``ca_publish_ahead`` later, a retired CA dropped at its notAfter);
this loop only keeps time. ``wake()`` makes it look again at once (after a forced rotation).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .issuer import Changes, Issuer

log = logging.getLogger(__name__)

MAX_SLEEP = 30.0  # look again at least this often (the wall clock may jump)
MIN_SLEEP = 0.01
RETRY_AFTER_ERROR = 1.0


class Rotator:
    def __init__(self, issuer: Issuer, *, clock: Callable[[], float], on_change: Callable[[Changes], None]) -> None:
        self.issuer = issuer
        self._clock = clock
        self._on_change = on_change
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            delay = RETRY_AFTER_ERROR
            try:
                changes = self.issuer.advance(self._clock())
                if changes:
                    self._on_change(changes)
                delay = self.issuer.next_event() - self._clock()
            except Exception:  # never let one bad step stop rotation for good
                log.exception("rotation step failed; trying again in %.0fs", RETRY_AFTER_ERROR)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(max(delay, MIN_SLEEP), MAX_SLEEP))
            except asyncio.TimeoutError:
                pass
