"""Token buckets per identity and per (identity, route), and the rate each identity sends.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; a request
takes one token from each bucket that applies and is *limited* when one of them is empty
(``retry_after`` says when the emptiest would have a token again). The policy decides what
a limited request gets (the shipped policy answers 429).

``MemoryRateLimiter`` keeps buckets in-process (bounded: the least recently used are
dropped past ``max_keys``, which only forgives a long-idle identity). ``RedisRateLimiter``
shares them between replicas (one Redis, Sentinel or Cluster): both buckets are updated
atomically by one Lua script, in one slot, with a TTL so idle buckets vanish. If Redis cannot answer, the check raises
``UnavailableError("ratelimit_unavailable")`` (the request fails closed) within the socket
timeout; it recovers by itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Protocol, Sequence

from ..errors import UnavailableError


@dataclass(frozen=True, slots=True)
class BucketSpec:
    rate: float  # tokens per second
    burst: float  # bucket size

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")


class RateResult(NamedTuple):  # a tuple: built on every request, cheaper than a frozen dataclass
    limited: bool
    remaining: float  # tokens left in the emptiest bucket
    retry_after: float  # seconds until that bucket has a token again (0 when not limited)


class RateLimiter(Protocol):
    async def take(self, buckets: Sequence[tuple[str, BucketSpec]], now: float, group: str = "") -> RateResult:
        """Take a token from each bucket (at once). ``group`` names what the buckets belong to
        (the identity); stores that shard keep a group's buckets together."""
        ...

    async def close(self) -> None: ...


def _result(outcomes: Iterable[tuple[bool, float, BucketSpec]]) -> RateResult:
    limited = False
    remaining = math.inf
    retry = 0.0
    for allowed, tokens, spec in outcomes:
        remaining = min(remaining, tokens)
        if not allowed:
            limited = True
            retry = max(retry, (1.0 - tokens) / spec.rate)
    return RateResult(limited, remaining, retry)


class MemoryRateLimiter:
    def __init__(self, *, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last]

    def _take_one(self, key: str, spec: BucketSpec, now: float) -> tuple[bool, float, BucketSpec]:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = [spec.burst, now]
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            elapsed = now - bucket[1]
            if elapsed > 0:
                bucket[0] = min(spec.burst, bucket[0] + elapsed * spec.rate)
                bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True, bucket[0], spec
        return False, bucket[0], spec

    async def take(self, buckets: Sequence[tuple[str, BucketSpec]], now: float, group: str = "") -> RateResult:
        return self.take_now(buckets, now)

    def take_now(self, buckets: Sequence[tuple[str, BucketSpec]], now: float) -> RateResult:
        """``take`` without a coroutine: nothing here waits."""
        return _result(self._take_one(key, spec, now) for key, spec in buckets)

    def __len__(self) -> int:
        return len(self._buckets)

    async def close(self) -> None:
        self._buckets.clear()


# KEYS: one bucket per key. ARGV: now, then (rate, burst, ttl_ms) per key. Returns, per key,
# 1/0 for "a token was taken" and the tokens left (as a string: Lua numbers lose decimals).
_TAKE = """
local now = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 + (i - 1) * 3])
  local burst = tonumber(ARGV[3 + (i - 1) * 3])
  local ttl = tonumber(ARGV[4 + (i - 1) * 3])
  local state = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(state[1]) or burst
  local last = tonumber(state[2]) or now
  if now > last then tokens = math.min(burst, tokens + (now - last) * rate); last = now end
  local taken = 0
  if tokens >= 1 then tokens = tokens - 1; taken = 1 end
  redis.call('HSET', key, 't', tostring(tokens), 'ts', tostring(last))
  redis.call('PEXPIRE', key, ttl)
  out[#out + 1] = taken
  out[#out + 1] = tostring(tokens)
end
return out
"""


class RedisRateLimiter:
    """Buckets in shared Redis (one server, Sentinel or Cluster: ``sharedstate``). The buckets of
    one ``take`` share the hash tag of their ``group`` (the identity), so the script that updates
    them runs in one Cluster slot."""

    def __init__(self, url: str, *, timeout: float = 0.25, prefix: str = "authz:rl:") -> None:
        from ..sharedstate import connect

        self._shared = connect(url, timeout=timeout, key="signals.rate.store")
        self._script = self._shared.client.register_script(_TAKE)
        self._prefix = prefix

    async def take(self, buckets: Sequence[tuple[str, BucketSpec]], now: float, group: str = "") -> RateResult:
        from ..sharedstate import STORE_ERRORS, tag

        args: list[float | int] = [now]
        for _, spec in buckets:
            # Idle long enough to refill completely: the bucket can go, it would be full anyway.
            args += [spec.rate, spec.burst, max(1000, int(math.ceil(spec.burst / spec.rate * 1000)) + 1000)]
        slot = self._prefix + tag(group or buckets[0][0])
        try:
            raw = await self._script(keys=[f"{slot}:{key}" for key, _ in buckets], args=args)
        except STORE_ERRORS as exc:
            raise UnavailableError(f"rate limit store unreachable: {exc}", code="ratelimit_unavailable") from None
        outcomes = [(bool(int(raw[i * 2])), float(raw[i * 2 + 1]), spec) for i, (_, spec) in enumerate(buckets)]
        return _result(outcomes)

    async def close(self) -> None:
        await self._shared.close()


class ObservedRate:
    """Requests per second each identity is sending, an exponentially decaying average
    (time constant ``tau``): ``r ← r·e^(−Δt/τ) + 1/τ`` per request."""

    def __init__(self, tau: float = 10.0, *, max_keys: int = 100_000) -> None:
        self.tau = tau
        self.max_keys = max_keys
        self._rates: OrderedDict[str, list[float]] = OrderedDict()

    def observe(self, key: str, now: float) -> float:
        entry = self._rates.get(key)
        if entry is None:
            entry = self._rates[key] = [0.0, now]
            if len(self._rates) > self.max_keys:
                self._rates.popitem(last=False)
        else:
            self._rates.move_to_end(key)
        rate = entry[0] * math.exp(-max(0.0, now - entry[1]) / self.tau) + 1.0 / self.tau
        entry[0], entry[1] = rate, now
        return rate
