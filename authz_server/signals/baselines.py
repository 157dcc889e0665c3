"""Anomaly baselines shared by every replica: decaying counters in Redis, updated in batches.

The hot path never waits on the store: ``AnomalyDetector`` scores each request from memory
as before (same ``input.signals.anomaly``). Every ``interval`` this task takes each identity's
news since the last flush (``take_pending``), sends it all in one pipeline (per node on a
Cluster), and merges the combined baseline that comes back (``merge_shared``). Another
replica's requests therefore count here within about one interval.

Layout, per identity, in one slot (hash tag), expiring after ``IDLE_TTL`` without news:
  ``authz:an:{<identity>}``         hash: t (last update), f (first seen), r, m, v, n, e, c
  ``authz:an:{<identity>}:routes``  sorted set: (method, route) pairs by when last seen

When the store does not answer, the news is kept for the next flush and every replica scores
from what it has meanwhile: the signal degrades to one replica's view, it never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from redis.exceptions import NoScriptError

from ..sharedstate import STORE_ERRORS, SharedRedis, connect, tag
from .anomaly import ALPHA, TAU_FAST, TAU_NEW, TAU_SLOW, WARMUP_SECONDS, AnomalyDetector, PendingBaseline, \
    SharedBaseline

log = logging.getLogger("authz_server.signals.baselines")

IDLE_TTL = 3 * TAU_SLOW
BATCH = 500  # identities per pipeline

# KEYS: the hash, the route set. ARGV: now, first, rate delta, request delta, outcomes, denials,
# send the routes back (1/0), warmup, learning routes, max routes, ttl ms, then the new routes.
# The formulas are anomaly.py's, applied once per batch.
_MERGE = f"""
local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 't', 'f', 'r', 'm', 'v', 'n', 'e', 'c')
local t = tonumber(h[1]) or now
local first = tonumber(ARGV[2])
local f = tonumber(h[2]) or first
if first < f then f = first end
local dt = now - t
if dt < 0 then dt = 0 end
local r = (tonumber(h[3]) or 0) * math.exp(-dt / {TAU_FAST}) + tonumber(ARGV[3])
local m = tonumber(h[4]) or 0
local v = tonumber(h[5]) or 0
local n = (tonumber(h[6]) or 0) * math.exp(-dt / {TAU_NEW})
local e = (tonumber(h[7]) or 0) * math.exp(-dt / {TAU_NEW})
local c = (tonumber(h[8]) or 0) + tonumber(ARGV[4])
if c < tonumber(ARGV[8]) or now - f < {WARMUP_SECONDS} then
  m = r
  v = 0
else
  local w = 1 - math.exp(-dt / {TAU_SLOW})
  local d = r - m
  m = m + w * d
  v = (1 - w) * (v + w * d * d)
end
local k = tonumber(ARGV[5])
if k > 0 then
  local keep = (1 - {ALPHA}) ^ k
  e = keep * e + (1 - keep) * tonumber(ARGV[6]) / k
end
local learning = tonumber(ARGV[9])
for i = 12, #ARGV do
  if redis.call('ZADD', KEYS[2], now, ARGV[i]) == 1 and c > 1 and redis.call('ZCARD', KEYS[2]) > learning then
    n = n + 1
  end
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[10]) + 1))
redis.call('HSET', KEYS[1], 't', tostring(now), 'f', tostring(f), 'r', tostring(r), 'm', tostring(m),
           'v', tostring(v), 'n', tostring(n), 'e', tostring(e), 'c', tostring(c))
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('PEXPIRE', KEYS[2], ARGV[11])
local routes = {{}}
if ARGV[7] == '1' then routes = redis.call('ZRANGE', KEYS[2], 0, -1) end
return {{tostring(f), tostring(r), tostring(m), tostring(v), tostring(n), tostring(e), tostring(c), routes}}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedBaselines:
    def __init__(self, detector: AnomalyDetector, url: str, *, interval: float = 1.0, timeout: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        self.detector = detector
        self.interval = interval
        self._clock = clock
        self._shared: SharedRedis = connect(url, timeout=timeout, key="signals.anomaly.store")
        self._script = self._shared.client.register_script(_MERGE)
        self._loaded = False
        self.flushes = 0
        self.failures = 0

    async def run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
                failing = False
            except STORE_ERRORS as exc:
                self.failures += 1
                if not failing:
                    log.warning("anomaly baselines not shared (%s): each replica scores from its own view "
                                "until the store answers", exc)
                failing = True

    async def flush(self) -> int:
        """Send every identity's news and merge the combined baselines; returns how many
        identities were merged. What the store did not take stays pending."""
        pending = self.detector.take_pending(self._clock())
        merged = handled = 0
        settings = self.detector.settings
        try:
            if pending and not self._loaded:
                # A Cluster pipeline does not load scripts by itself: every primary gets it first.
                await self._shared.client.script_load(_MERGE)
                self._loaded = True
            for start in range(0, len(pending), BATCH):
                chunk = pending[start:start + BATCH]
                pipe = self._shared.client.pipeline(transaction=False)
                for item in chunk:
                    key = f"authz:an:{tag(item.identity)}"
                    await self._script(keys=[key, f"{key}:routes"], client=pipe, args=[
                        item.at, item.first, item.rate_delta, item.requests_delta, item.outcomes, item.denials,
                        0 if item.seeded else 1, settings.warmup, settings.learning_routes, settings.max_routes,
                        int(IDLE_TTL * 1000), *item.routes])
                replies = await pipe.execute(raise_on_error=False)
                now = self._clock()
                for item, reply in zip(chunk, replies):
                    handled += 1
                    if isinstance(reply, BaseException):
                        self._loaded = self._loaded and not isinstance(reply, NoScriptError)  # a new primary
                        self.detector.restore_pending(item)
                    else:
                        self.detector.merge_shared(item, _shared_baseline(item.at, reply), now)
                        merged += 1
        except STORE_ERRORS:
            for item in pending[handled:]:
                self.detector.restore_pending(item)
            raise
        self.flushes += 1
        return merged

    async def close(self) -> None:
        await self._shared.close()


def _shared_baseline(at: float, reply: list[Any]) -> SharedBaseline:
    first, rate, mean, var, news, errors, count, routes = reply
    return SharedBaseline(at, float(_text(first)), float(_text(rate)), float(_text(mean)), float(_text(var)),
                          float(_text(news)), float(_text(errors)), int(float(_text(count))),
                          tuple(_text(r) for r in routes or ()))


__all__ = ["SharedBaselines", "PendingBaseline"]
