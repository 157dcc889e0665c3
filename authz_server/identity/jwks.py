"""An issuer's key set over time: fetched, cached, refreshed, and served stale within a bound.

Policy, per issuer (``RefreshSettings``):

- The last good set is kept; a failed or bad refresh never replaces it.
- It is fresh for the publisher's ``Cache-Control: max-age``, clamped to
  [``min_max_age``, ``max_max_age``] (``default_max_age`` when none is sent). A background
  task refreshes it at 80% of that.
- A token whose ``kid`` is unknown asks for a refresh (the issuer may have rotated), at most
  once per ``unknown_kid_interval``; concurrent misses share the one fetch in flight. So a
  flood of made-up kids costs the provider one request per interval, not one per token.
- When the provider is down the set is served stale for ``max_stale`` past its freshness;
  after that validation fails closed with ``UnavailableError(code="jwks_unavailable")``.
- ``status()`` tells the admin API and metrics what happened: kids, last refresh, last error,
  stale or not, and counters.

The network sits behind ``JwksFetcher`` (one method); ``HttpxJwksFetcher`` is the real one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import httpx

from ..errors import UnavailableError
from .jose import JwkSet

log = logging.getLogger("authz_server.identity.jwks")

REFRESH_AHEAD = 0.8  # background refresh at this fraction of the freshness lifetime
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:,|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FetchedDocument:
    """A fetched body, and how long its publisher says it may be cached (seconds, or None)."""

    body: bytes
    max_age: float | None = None


class JwksFetcher(Protocol):
    """The one network operation identity needs: GET a JSON document (discovery or JWKS)."""

    async def fetch(self, url: str) -> FetchedDocument: ...


class FetchError(Exception):
    """A fetch that did not produce a usable document; the message says why."""


def cache_max_age(cache_control: str | None) -> float | None:
    """``max-age`` from a Cache-Control header (RFC 9111 §5.2.2.1); ``no-store``/``no-cache``
    count as 0 (the caller's lower bound then applies)."""
    if not cache_control:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


class HttpxJwksFetcher:
    """GET over httpx: TLS verification on (optionally against ``ca_file``), timeouts, no
    redirects, a cap on the body size, 200 only."""

    def __init__(self, *, timeout: float = 5.0, max_bytes: int = 512 * 1024, verify: bool = True,
                 ca_file: str | None = None) -> None:
        self.max_bytes = max_bytes
        verify_arg: Any = verify
        if verify and ca_file:
            import ssl

            verify_arg = ssl.create_default_context(cafile=ca_file)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), verify=verify_arg, follow_redirects=False, trust_env=False,
            # Fetches are minutes apart: a pooled connection would only be a stale one.
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"accept": "application/json", "user-agent": "authz-server"},
        )

    async def fetch(self, url: str) -> FetchedDocument:
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise FetchError(f"GET {url}: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise FetchError(f"GET {url}: {declared} bytes is over the {self.max_bytes}-byte limit")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FetchError(f"GET {url}: body is over the {self.max_bytes}-byte limit")
                    chunks.append(chunk)
                return FetchedDocument(b"".join(chunks), cache_max_age(response.headers.get("cache-control")))
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {url}: {type(exc).__name__}: {exc or 'no detail'}") from None

    async def aclose(self) -> None:
        await self._client.aclose()


class KeySource(Protocol):
    """Where an issuer's keys come from (a file, a JWKS URL, discovery, a shared secret)."""

    description: str
    static: bool  # True: loaded once, never expires (file, secret)

    async def load(self) -> tuple[JwkSet, float | None]: ...


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    default_max_age: float = 300.0
    min_max_age: float = 60.0
    max_max_age: float = 86400.0
    unknown_kid_interval: float = 30.0
    max_stale: float = 3600.0
    retry_interval: float = 10.0
    timeout: float = 5.0
    max_bytes: int = 512 * 1024

    def freshness(self, max_age: float | None) -> float:
        value = self.default_max_age if max_age is None else max_age
        return min(max(value, self.min_max_age), self.max_max_age)


@dataclass(frozen=True)
class KeySetStatus:
    """One issuer's key set as the admin API and metrics see it (times are Unix seconds)."""

    issuer: str
    source: str
    kids: tuple[str, ...]
    keys: int
    skipped: tuple[str, ...]
    last_refresh: float | None
    last_attempt: float | None
    last_error: str | None
    last_error_at: float | None
    fresh_until: float | None
    usable_until: float | None
    stale: bool
    available: bool
    refreshes: int
    failures: int
    unknown_kid_refreshes: int
    unknown_kid_throttled: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class IssuerKeys:
    """The cached key set of one issuer, with the refresh policy in the module docstring."""

    def __init__(self, issuer: str, source: KeySource, settings: RefreshSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self.source = source
        self.settings = settings
        self._clock = clock
        self._keys: JwkSet | None = None
        self._fetched_at: float | None = None
        self._fresh_until = -math.inf
        self._last_attempt: float | None = None
        self._next_retry = -math.inf
        self._failing = False
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self.refreshes = 0
        self.failures = 0
        self.unknown_kid_refreshes = 0
        self.unknown_kid_throttled = 0

    # -- the request path
    def prime(self, keys: JwkSet, now: float) -> None:
        """Install a set loaded at start (a file or secret), fresh forever if the source is static."""
        self._keys = keys
        self._fetched_at = now
        self._fresh_until = math.inf if self.source.static else now + self.settings.freshness(None)
        self.refreshes += 1

    async def current(self, now: float) -> JwkSet:
        """Keys to validate with at ``now``; raises ``UnavailableError("jwks_unavailable")``."""
        keys = self._keys
        if keys is not None and now < self._fresh_until:
            return keys
        if keys is not None and now < self._fresh_until + self.settings.max_stale:
            # Stale but within bound: answer now, refresh behind the request.
            if now >= self._next_retry:
                self._start_refresh(now)
            return keys
        if self._inflight is not None or now >= self._next_retry:
            await self._refresh(now)
        keys = self._keys
        if keys is not None and now < self._fresh_until + self.settings.max_stale:
            return keys
        detail = self._last_error or "no key set loaded yet"
        raise UnavailableError(f"keys of {self.issuer} are unavailable: {detail}", code="jwks_unavailable")

    async def refresh_for_unknown_kid(self, now: float) -> JwkSet | None:
        """A token named a kid we do not have: refresh once, rate-limited and shared.

        Returns the set after the refresh, or None when the rate limit held it back."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return self._keys
        if self._last_attempt is not None and now - self._last_attempt < self.settings.unknown_kid_interval:
            self.unknown_kid_throttled += 1
            return None
        self.unknown_kid_refreshes += 1
        await self._refresh(now)
        return self._keys

    # -- refreshing
    async def refresh(self, now: float | None = None) -> bool:
        """Refresh now (shared with any refresh in flight); True if the set is good afterwards."""
        await self._refresh(self._clock() if now is None else now)
        return not self._failing

    def _start_refresh(self, now: float) -> asyncio.Task[None]:
        if self._inflight is None:
            task = asyncio.get_running_loop().create_task(self._do_refresh(now), name=f"jwks refresh {self.issuer}")
            self._inflight = task
            task.add_done_callback(self._finished)
        return self._inflight

    def _finished(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh(self, now: float) -> None:
        # shield: a request that gives up must not cancel the fetch others are waiting on
        await asyncio.shield(self._start_refresh(now))

    async def _do_refresh(self, now: float) -> None:
        self._last_attempt = now
        try:
            keys, max_age = await asyncio.wait_for(self.source.load(), timeout=self.settings.timeout * 2 + 1)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure keeps the last good set; the reason is reported
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"timed out after {self.settings.timeout * 2 + 1:.0f}s"
            self.failures += 1
            self._failing = True
            self._last_error, self._last_error_at = reason, now
            self._next_retry = now + self.settings.retry_interval
            log.warning("key set refresh for %s failed (%s); %s", self.issuer, reason,
                        "keeping the last good set" if self._keys is not None else "no keys yet")
            return
        changed = self._keys is None or set(self._keys.kids) != set(keys.kids)
        self._keys = keys
        self._fetched_at = now
        self._fresh_until = math.inf if self.source.static else now + self.settings.freshness(max_age)
        self._failing = False
        self._next_retry = -math.inf
        self.refreshes += 1
        if changed:
            log.info("key set for %s: kids %s%s", self.issuer, ", ".join(keys.kids) or "(none named)",
                     f"; skipped {len(keys.skipped)}" if keys.skipped else "")

    async def run(self) -> None:
        """Background refresh loop (started by ``IssuerRegistry.start``, cancelled by ``close``)."""
        if self.source.static:
            return
        while True:
            if self._keys is None or self._failing or self._fetched_at is None:
                due = self._next_retry
            else:
                due = self._fetched_at + REFRESH_AHEAD * (self._fresh_until - self._fetched_at)
            delay = due - self._clock()
            if delay > 0:
                await asyncio.sleep(min(delay, 3600.0))
                continue
            await self._refresh(self._clock())

    async def wait_idle(self) -> None:
        """Wait for a refresh in flight, if any (shutdown, and tests that need to observe one)."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    async def cancel(self) -> None:
        task = self._inflight
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    def status(self, now: float | None = None) -> KeySetStatus:
        now = self._clock() if now is None else now
        keys = self._keys
        usable_until = self._fresh_until + self.settings.max_stale if keys is not None else None
        return KeySetStatus(
            issuer=self.issuer, source=self.source.description,
            kids=keys.kids if keys is not None else (), keys=len(keys.keys) if keys is not None else 0,
            skipped=keys.skipped if keys is not None else (),
            last_refresh=self._fetched_at, last_attempt=self._last_attempt,
            last_error=self._last_error, last_error_at=self._last_error_at,
            fresh_until=None if keys is None or math.isinf(self._fresh_until) else self._fresh_until,
            usable_until=None if usable_until is None or math.isinf(usable_until) else usable_until,
            stale=keys is not None and now >= self._fresh_until,
            available=keys is not None and usable_until is not None and now < usable_until,
            refreshes=self.refreshes, failures=self.failures,
            unknown_kid_refreshes=self.unknown_kid_refreshes, unknown_kid_throttled=self.unknown_kid_throttled,
        )
