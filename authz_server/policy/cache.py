"""The decision cache: LRU with a deadline per entry.

Keys are digests built by the pipeline (policy version + query + the request's
non-volatile facts + identity + signals, or the policy's declared key paths); values are
whatever the pipeline stores (the policy's verdict and raw result). An entry never
outlives its own deadline, which the pipeline sets to the earliest of the cache TTL and
anything in the request that expires (token ``exp``, session expiry).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    invalidations: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class DecisionCache(Generic[V]):
    __slots__ = ("max_entries", "_entries", "stats")

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, V]] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        if entry[0] <= now:
            del self._entries[key]
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[1]

    def put(self, key: bytes, value: V, expires_at: float, now: float) -> None:
        if self.max_entries == 0 or expires_at <= now:
            return
        entries = self._entries
        entries[key] = (expires_at, value)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.stats.evictions += 1

    def clear(self) -> None:
        """Drop everything (policy or data changed)."""
        if self._entries:
            self._entries.clear()
        self.stats.invalidations += 1
