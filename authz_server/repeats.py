"""Requests seen before, answered without deciding again.

Clients repeat themselves: the same call from the same workload, again and again. When a
request's key matches one whose allow came from the decision cache, the front hands the
earlier decision to ``Pipeline.replay``, which re-checks everything that can change (the
cached verdict's deadline, the policy version, the identity) and gives it a new decision id.
The HTTP front keys by the request bytes themselves; the gRPC front by the request bytes
minus its per-request values (``envoy.cut_volatile``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from .decision import Decision, Pipeline
from .facts import Facts


@dataclass(slots=True)
class Repeat:
    decision: Decision  # the cached allow it came from (its memo holds the rendering)
    facts: Facts  # of the first such request: what the observers (audit) of every repeat get, or start from


def replayable(decision: Decision) -> bool:
    """An allow that came from the decision cache, with its rendering kept and a deadline."""
    return decision.allowed and decision.cached and decision.memo is not None and decision.valid_until is not None


class RepeatCache:
    """Key → the ``Repeat`` behind it, oldest out first. Whether a repeat still holds is
    ``Pipeline.replay``'s to judge: ``replay`` asks it, and counts the repeats it answers.

    An entry keeps the first request's facts, body included, and its key (at most the request's
    size): only requests of up to ``max_request_bytes`` are kept, so the cache holds at most
    ``max_entries`` times twice that."""

    def __init__(self, max_entries: int = 20_000, max_request_bytes: int = 16 * 1024) -> None:
        self.max_entries = max_entries
        self.max_request_bytes = max_request_bytes
        self._entries: OrderedDict[bytes, Repeat] = OrderedDict()
        self.hits = 0

    def replay(self, key: bytes, pipeline: Pipeline, now: float,
               facts_of: Callable[[Facts], Facts] = lambda first: first) -> Decision | None:
        """The decision kept under ``key`` again, through ``pipeline.replay``, with the facts
        ``facts_of`` makes from the first request's; None when there is none or it no longer holds."""
        entry = self._entries.get(key) if self._entries else None
        if entry is None:
            return None
        decision = pipeline.replay(entry.decision, facts_of(entry.facts), now=now)
        if decision is not None:
            self.hits += 1
        return decision

    def put(self, key: bytes, decision: Decision, facts: Facts, request_bytes: int) -> None:
        """Keep ``decision`` if it is ``replayable`` and its request was small enough."""
        if self.max_entries <= 0 or request_bytes > self.max_request_bytes or not replayable(decision):
            return
        self._entries[key] = Repeat(decision, facts)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
