"""Polling one bundle resource as OPA's bundle service API specifies.

``GET <service url>/<resource>`` with ``If-None-Match: <etag>`` once a bundle was taken, and
``Prefer: modes=snapshot`` (plus ``wait=<long_polling_timeout_seconds>`` once the server has
answered with ``Content-Type: application/vnd.openpolicyagent.bundles``, OPA's sign that it
holds requests until the bundle changes). 200 gives a bundle and its ``ETag``; 304 means
unchanged. After a success the next request follows at once when long polling, else after a
delay drawn uniformly between ``min_delay_seconds`` and ``max_delay_seconds``; after a failure,
after OPA's backoff (100 ms growing by 1.6 per retry, jittered by 20 %, capped at the max delay).

The loop is the I/O shell; ``next_delay`` is the pure part (time and randomness passed in).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable

from .config import BundleSource
from .service import ServiceClient, ServiceError

LONG_POLL_CONTENT_TYPE = "application/vnd.openpolicyagent.bundles"
MIN_RETRY_DELAY = 0.1

log = logging.getLogger("authz_server.bundles")


@dataclass(frozen=True)
class Download:
    """What one request gave: a new bundle (``body``), ``not_modified``, or an ``error``."""

    body: bytes | None = None
    etag: str = ""
    not_modified: bool = False
    error: ServiceError | None = None
    long_poll: bool = False


def backoff(retries: int, maximum: float, *, rand: Callable[[], float] = random.random) -> float:
    """OPA's ``util.DefaultBackoff`` (the gRPC algorithm): 0 before the first retry."""
    if retries <= 0:
        return 0.0
    delay = MIN_RETRY_DELAY
    while delay < maximum and retries > 0:
        delay *= 1.6
        retries -= 1
    delay = min(delay, maximum)
    return max(delay * (1 + 0.2 * (rand() * 2 - 1)), 0.0)


def next_delay(source: BundleSource, download: Download, retries: int, *, refused: bool = False,
               rand: Callable[[], float] = random.random) -> float:
    """After an error or a refused bundle: backoff (a long poll would hand back the same
    bundle at once); after a long poll: none; else uniform between the min and max delay."""
    if download.error is not None or refused:
        return backoff(retries, source.polling.max_delay, rand=rand)
    if download.long_poll and source.polling.long_polling_timeout is not None:
        return 0.0
    low, high = source.polling.min_delay, source.polling.max_delay
    return low + (high - low) * rand()


class Downloader:
    """Fetches ``source`` forever, handing every outcome to ``on_download`` (False: refused)."""

    def __init__(self, source: BundleSource, client: ServiceClient,
                 on_download: Callable[[BundleSource, Download], Awaitable[bool]]) -> None:
        self.source = source
        self.client = client
        self.on_download = on_download
        self.etag = ""  # of the bundle now serving (a refused one does not count)
        self.long_poll = False
        self.retries = 0
        self.wake = asyncio.Event()  # set to poll now (tests, admin): skips the wait

    async def fetch(self) -> Download:
        source = self.source
        headers = {"prefer": "modes=snapshot"}
        timeout = None
        if self.etag:
            headers["if-none-match"] = self.etag
        if self.long_poll and source.polling.long_polling_timeout is not None:
            headers["prefer"] += f";wait={source.polling.long_polling_timeout}"
            timeout = source.polling.long_polling_timeout + self.client.config.response_header_timeout
        try:
            reply = await self.client.request("GET", source.resource, headers=headers, timeout=timeout,
                                              max_bytes=source.size_limit)
        except ServiceError as exc:
            return Download(error=exc)
        long_poll = reply.headers.get("content-type", "").split(";")[0].strip() == LONG_POLL_CONTENT_TYPE
        if reply.status == 304:
            return Download(etag=reply.headers.get("etag", "") or self.etag, not_modified=True,
                            long_poll=self.long_poll)
        if reply.status != 200:
            return Download(error=ServiceError(f"server replied with HTTP {reply.status}", http_status=reply.status,
                                               code="bundle_download_failed"))
        return Download(body=reply.body, etag=reply.headers.get("etag", ""), long_poll=long_poll)

    async def run(self) -> None:
        while True:
            download = await self.fetch()
            if download.error is None:
                self.long_poll = download.long_poll
            try:
                accepted = await self.on_download(self.source, download)
            except Exception:  # a bug in handling one download must not stop the polling
                log.exception("bundle %s: handling a download failed", self.source.name)
                accepted = False
            self.retries = self.retries + 1 if download.error is not None or not accepted else 0
            delay = next_delay(self.source, download, self.retries, refused=not accepted)
            if delay > 0:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), delay)
                except TimeoutError:
                    pass
