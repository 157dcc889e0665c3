"""An anomaly score per identity, against that identity's own decaying baseline.

Per identity we keep (all decaying with time, so it recovers by itself when it calms down):

* ``r``  — its current request rate: ``r ← r·e^(−Δt/τ_fast) + 1/τ_fast`` (τ_fast = 10 s);
* ``μ, σ²`` — its usual rate: an exponentially weighted mean and variance of ``r`` with
  weight ``w = 1 − e^(−Δt/τ_slow)`` per request (τ_slow = 10 min). During an identity's
  warm-up (its first ``warmup`` requests and first 3·τ_fast = 30 s, while ``r`` is still
  ramping up to its steady value) ``μ`` simply follows ``r`` and there is no rate term;
* ``n``  — new routes lately: ``n ← n·e^(−Δt/τ_new) (+1 if the (method, route) pair was never
  seen)`` (τ_new = 60 s). The first ``learning_routes`` (12) distinct pairs are learning, not
  news, so a new identity is not flagged for having a first day;
* ``e``  — its deny ratio lately: ``e ← e·e^(−Δt/τ_new)``, then ``e ← e + α(denied − e)`` on
  each outcome (α = 0.1).

Terms, each zero in normal life:

* rate:  ``max(0, z − 3)`` with ``z = (r − μ) / √(σ² + (0.1·μ + 1)²)``, after warm-up;
* news:  ``max(0, n − 3)``  (a few new routes a minute is normal);
* denials: ``10 · max(0, e − 0.3)``.

``score = 1 − e^(−(0.5·rate + 0.4·news + denials))`` in [0, 1); ``level`` is ``anomalous``
at ``threshold`` (0.8) and above, ``elevated`` from half of it, else ``normal``. A scanner
trying new endpoints is anomalous after about twenty distinct endpoints; an identity sending
ten times its usual rate within about ten seconds. Memory is bounded: at most
``max_identities`` (least recently seen dropped) and ``max_routes`` remembered pairs each.

Shared baselines (``signals.anomaly.store``, ``signals/baselines.py``): the hot path stays
this in-process detector; a background task sends each identity's news since the last flush
to the store and merges the combined baseline back. Decaying sums add up across replicas:
the rate a replica contributes since ``synced_at`` is its ``r`` minus the shared rate it
last merged, decayed to now (exact, whatever the request times); request counts add; the
deny ratio takes a batch of ``k`` outcomes with ``d`` denials as ``k`` steps of the same
average, ``e ← (1−α)^k·e + (1 − (1−α)^k)·d/k``; a route counts as new only when no replica
knew it; ``μ, σ²`` move once per flush with the weight of the time since the last one.
``take_pending`` and ``merge_shared`` are that bookkeeping, without I/O.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

TAU_FAST = 10.0
TAU_SLOW = 600.0
TAU_NEW = 60.0
ALPHA = 0.1
WARMUP_SECONDS = 3 * TAU_FAST  # r takes this long to reach a steady sender's rate


@dataclass(frozen=True, slots=True)
class AnomalySettings:
    threshold: float = 0.8
    warmup: int = 20
    learning_routes: int = 12
    max_identities: int = 100_000
    max_routes: int = 64


@dataclass(slots=True)
class _State:
    last: float
    first: float = 0.0
    rate: float = 0.0
    mean: float = 0.0
    var: float = 0.0
    news: float = 0.0
    errors: float = 0.0
    requests: int = 0
    routes: OrderedDict[str, None] = field(default_factory=OrderedDict)
    score: float = 0.0
    terms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # Shared baselines only: what the store already counts, and what it has not seen yet.
    synced_at: float = 0.0  # 0: never merged
    synced_rate: float = 0.0  # the shared r at synced_at
    synced_requests: int = 0
    outcomes: int = 0
    denials: int = 0
    fresh_routes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PendingBaseline:
    """One identity's news since its last flush, as sent to the store at ``at``."""

    identity: str
    at: float
    first: float
    rate: float  # this replica's r at ``at``
    rate_delta: float  # what it adds to the shared r at ``at``
    requests: int  # this replica's count at ``at``
    requests_delta: int
    outcomes: int
    denials: int
    routes: tuple[str, ...]
    seeded: bool  # merged before: no need to send back the shared route list


@dataclass(frozen=True, slots=True)
class SharedBaseline:
    """An identity's combined baseline as the store has it at ``at``."""

    at: float
    first: float
    rate: float
    mean: float
    var: float
    news: float
    errors: float
    requests: int
    routes: tuple[str, ...] = ()


class AnomalyDetector:
    def __init__(self, settings: AnomalySettings | None = None, *, shared: bool = False) -> None:
        self.settings = settings or AnomalySettings()
        self._states: OrderedDict[str, _State] = OrderedDict()
        # Identities with news for the store since the last flush (None: nothing is shared).
        self._dirty: set[str] | None = set() if shared else None

    def __len__(self) -> int:
        return len(self._states)

    def observe(self, identity: str, method: str, route: str, now: float) -> float:
        """Account for one request and return the identity's score."""
        return self._observe(identity, method, route, now).score

    def observe_request(self, identity: str, method: str, route: str, now: float) -> tuple[dict[str, Any], float]:
        """Account for one request; ``input.signals.anomaly`` after it (``to_input``) and the
        identity's current rate ``r``, which is what ``ratelimit.ObservedRate`` would say."""
        state = self._observe(identity, method, route, now)
        return self._input(state), state.rate

    def _observe(self, identity: str, method: str, route: str, now: float) -> _State:
        settings = self.settings
        states = self._states
        state = states.get(identity)
        if state is None:
            state = states[identity] = _State(last=now, first=now)
            if len(states) > settings.max_identities:
                states.popitem(last=False)
        else:
            states.move_to_end(identity)
        if self._dirty is not None:
            self._dirty.add(identity)
        dt = max(0.0, now - state.last)
        state.last = now
        decay_new = math.exp(-dt / TAU_NEW)
        state.rate = state.rate * math.exp(-dt / TAU_FAST) + 1.0 / TAU_FAST
        if self._warming(state, now):
            state.mean, state.var = state.rate, 0.0  # r is still ramping up: nothing to deviate from yet
        else:
            weight = 1.0 - math.exp(-dt / TAU_SLOW)
            delta = state.rate - state.mean
            state.mean += weight * delta
            state.var = (1.0 - weight) * (state.var + weight * delta * delta)
        state.news *= decay_new
        state.errors *= decay_new
        state.requests += 1
        pair = f"{method} {route}"
        routes = state.routes
        if pair in routes:
            routes.move_to_end(pair)
        else:
            routes[pair] = None
            if len(routes) > settings.max_routes:
                routes.popitem(last=False)
            if state.requests > 1 and len(routes) > settings.learning_routes:
                state.news += 1.0
            if self._dirty is not None and len(state.fresh_routes) < settings.max_routes:
                state.fresh_routes.append(pair)
        self._score(state)
        return state

    def _warming(self, state: _State, now: float) -> bool:
        return state.requests < self.settings.warmup or now - state.first < WARMUP_SECONDS

    def record_outcome(self, identity: str, denied: bool) -> None:
        state = self._states.get(identity)
        if state is not None:
            # The score follows at the identity's next request; nothing reads it before.
            state.errors += ALPHA * ((1.0 if denied else 0.0) - state.errors)
            if self._dirty is not None:
                state.outcomes += 1
                state.denials += denied
                self._dirty.add(identity)

    # -- shared baselines (no I/O here: signals/baselines.py sends and fetches)
    def take_pending(self, now: float) -> list[PendingBaseline]:
        """Every identity's news since its last flush, as of ``now``; the outcome and route
        news is handed over (``restore_pending`` gives it back if the store cannot take it)."""
        if not self._dirty:
            return []
        dirty, self._dirty = self._dirty, set()
        pending = []
        for identity in dirty:
            state = self._states.get(identity)
            if state is None:
                continue  # dropped from memory meanwhile: its news goes with it
            rate = state.rate * math.exp(-max(0.0, now - state.last) / TAU_FAST)
            already = state.synced_rate * math.exp(-max(0.0, now - state.synced_at) / TAU_FAST)
            pending.append(PendingBaseline(
                identity, now, state.first, rate, max(0.0, rate - already), state.requests,
                max(0, state.requests - state.synced_requests), state.outcomes, state.denials,
                tuple(state.fresh_routes), state.synced_at > 0))
            state.outcomes = state.denials = 0
            state.fresh_routes = []
        return pending

    def restore_pending(self, pending: PendingBaseline) -> None:
        state = self._states.get(pending.identity)
        if state is None or self._dirty is None:
            return
        state.outcomes += pending.outcomes
        state.denials += pending.denials
        state.fresh_routes[:0] = pending.routes
        self._dirty.add(pending.identity)

    def merge_shared(self, sent: PendingBaseline, shared: SharedBaseline, now: float) -> None:
        """Adopt the combined baseline, keeping what this replica saw since ``sent.at``."""
        state = self._states.get(sent.identity)
        if state is None:
            return
        since = now - sent.at
        fast, new = math.exp(-max(0.0, since) / TAU_FAST), math.exp(-max(0.0, since) / TAU_NEW)
        local_since = state.rate * math.exp(-max(0.0, now - state.last) / TAU_FAST) - sent.rate * fast
        state.rate = shared.rate * fast + max(0.0, local_since)
        state.requests = shared.requests + max(0, state.requests - sent.requests)
        state.mean, state.var = shared.mean, shared.var
        state.news = shared.news * new
        state.errors = shared.errors * new
        state.first = min(state.first, shared.first)
        state.last = max(state.last, now)
        state.synced_at, state.synced_rate, state.synced_requests = shared.at, shared.rate, shared.requests
        routes = state.routes
        for pair in shared.routes:  # what other replicas know is not news here
            if len(routes) >= self.settings.max_routes:
                break
            if pair not in routes:
                routes[pair] = None
                routes.move_to_end(pair, last=False)  # known elsewhere, not recently here
        self._score(state)

    def _score(self, state: _State) -> None:
        rate_term = 0.0
        if not self._warming(state, state.last):
            spread = math.sqrt(state.var + (0.1 * state.mean + 1.0) ** 2)
            rate_term = max(0.0, (state.rate - state.mean) / spread - 3.0)
        news_term = max(0.0, state.news - 3.0)
        error_term = 10.0 * max(0.0, state.errors - 0.3)
        state.terms = (rate_term, news_term, error_term)
        state.score = 1.0 - math.exp(-(0.5 * rate_term + 0.4 * news_term + error_term))

    def level(self, score: float) -> str:
        threshold = self.settings.threshold
        return "anomalous" if score >= threshold else "elevated" if score >= threshold / 2 else "normal"

    def to_input(self, identity: str) -> dict[str, Any]:
        state = self._states.get(identity)
        if state is None:
            return {"score": 0.0, "level": "normal", "rate_z": 0.0, "new_routes": 0.0, "error_ratio": 0.0,
                    "reasons": []}
        return self._input(state)

    def _input(self, state: _State) -> dict[str, Any]:
        score = state.score
        rate_term, news_term, error_term = state.terms
        if not (rate_term or news_term or error_term):  # normal life, the common case on the hot path
            return {"score": 0.0, "level": "normal", "rate_z": 0.0, "new_routes": round(state.news, 2),
                    "error_ratio": round(state.errors, 3), "reasons": []}
        reasons = [name for name, term in (("rate", rate_term), ("new_routes", news_term), ("denials", error_term))
                   if term > 0]
        return {"score": round(score, 4), "level": self.level(score),
                "rate_z": round(rate_term + 3.0 if rate_term else 0.0, 2), "new_routes": round(state.news, 2),
                "error_ratio": round(state.errors, 3), "reasons": reasons}
