"""Requests seen before, answered without deciding again.

Clients repeat themselves: the same call from the same workload, again and again. When a
request's digest matches one whose allow came from the decision cache, the front hands the
earlier decision to ``Pipeline.replay``, which re-checks everything that can change (the
cached verdict's deadline, the policy version, the identity) and gives it a new decision id.
The HTTP front keys by the request bytes themselves; the gRPC front by ``Facts.fingerprint``
(the request minus its per-request values).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .decision import Decision
from .facts import Facts


@dataclass(slots=True)
class Repeat:
    decision: Decision  # the cached allow it came from (its memo holds the rendering)
    facts: Facts  # of the first such request (the HTTP front replays it to the observers)
    expires_at: float
    version: str


def replayable(decision: Decision) -> bool:
    """An allow that came from the decision cache, with its rendering kept and a deadline."""
    return decision.allowed and decision.cached and decision.memo is not None and decision.valid_until is not None


class RepeatCache:
    """Digest → the ``Repeat`` behind it; oldest out first, emptied by a policy change.

    An entry keeps the first request's facts, body included: only requests of up to
    ``max_request_bytes`` are kept, so the cache holds at most ``max_entries`` times that."""

    def __init__(self, max_entries: int = 20_000, max_request_bytes: int = 16 * 1024) -> None:
        self.max_entries = max_entries
        self.max_request_bytes = max_request_bytes
        self._entries: OrderedDict[bytes, Repeat] = OrderedDict()
        self.hits = 0

    def get(self, key: bytes, now: float, version: str) -> Repeat | None:
        entry = self._entries.get(key) if self._entries else None
        if entry is None or entry.expires_at <= now or entry.version != version:
            return None
        self.hits += 1
        return entry

    def put(self, key: bytes, decision: Decision, facts: Facts, request_bytes: int) -> None:
        """Keep ``decision`` if it is ``replayable`` and its request was small enough."""
        if self.max_entries <= 0 or request_bytes > self.max_request_bytes or not replayable(decision):
            return
        assert decision.valid_until is not None
        self._entries[key] = Repeat(decision, facts, decision.valid_until, decision.policy_version)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
