"""Authorization accuracy: generated traffic decided by the real pipeline, each decision compared
with the oracle's.

The pipeline is authz-server's own ``App`` (``inprocess.py``): the shipped policies, the identity
service with its memory session store and the dev provider's keys, the signals. A request counts
as a mismatch when the pipeline allows what the oracle denies or the other way round, or when
both deny with a different status (401 identity, 403 forbidden, 429 throttled): each one is
reported with the request, what the oracle expected and why, and what the pipeline answered.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .inprocess import InProcessTarget, InProcessWorld
from .model import Request
from .oracle import GUESSED, Bucket, Expected, Oracle, OracleSettings, load_route_table
from .traffic import Revoke, Step, Traffic, generate, guessed_session_id
from .world import Limits

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Mismatch:
    index: int
    kind: str
    request: str
    expected_allowed: bool
    expected_status: int
    why: str
    got_status: int
    got_code: str


@dataclass
class AccuracyResult:
    requests: int
    mismatches: list[Mismatch]
    seconds: float
    seed: int
    quick: bool
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    by_sensitivity: dict[str, dict[str, int]] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return 1.0 - len(self.mismatches) / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "mismatches": len(self.mismatches), "accuracy": self.accuracy,
                "seed": self.seed, "quick": self.quick, "seconds": round(self.seconds, 2),
                "by_kind": self.by_kind, "by_sensitivity": self.by_sensitivity, "by_status": self.by_status,
                "mismatch_details": [asdict(m) for m in self.mismatches]}


class _Credentials:
    """Labels to secrets: tokens minted when first used, session ids as the answers handed them out."""

    def __init__(self, target: InProcessTarget, traffic: Traffic) -> None:
        self.target = target
        self.traffic = traffic
        self.tokens: dict[str, str] = {}
        self.sessions: dict[str, str] = {}

    async def token(self, label: str) -> str:
        found = self.tokens.get(label)
        if found is None:
            facts = self.traffic.tokens[label]
            if facts.kind == "exchanged":
                subject = await self.token(self.traffic.exchanged_from[label])
                found = await self.target.exchange(facts.actor, subject, facts.audience)
            elif facts.defect:
                found = self.target.forged_token(facts.defect, facts.subject)
            else:
                found = self.target.user_token(facts.subject)
            self.tokens[label] = found
        return found

    def session(self, label: str) -> str:
        if label == GUESSED:
            return guessed_session_id()
        # A label whose sign-in was refused has no session: present one nobody was given.
        return self.sessions.get(label) or self.sessions.setdefault(f"never:{label}", guessed_session_id())


async def run_accuracy(policies: Path, folder: Path, *, count: int, seed: int = 8, quick: bool = False,
                       progress: Progress = lambda _line: None) -> AccuracyResult:
    routes = load_route_table(policies)
    traffic = generate(routes, count=count, seed=seed)
    limits = Limits()
    world = await InProcessWorld.create(policies, folder, limits=limits, audit=False)
    oracle = Oracle(routes, OracleSettings(rate=Bucket(limits.rate, limits.burst),
                                           failures=Bucket(limits.failure_rate, limits.failure_burst)))
    for label, facts in traffic.tokens.items():
        oracle.know_token(label, facts)
    target = InProcessTarget(world)
    credentials = _Credentials(target, traffic)
    mismatches: list[Mismatch] = []
    by_kind: dict[str, Counter[str]] = {}
    by_sensitivity: dict[str, Counter[str]] = {}
    statuses: Counter[str] = Counter()
    started = time.perf_counter()
    done = 0
    total = traffic.requests
    try:
        for item in traffic.items:
            if isinstance(item, Revoke):
                world.at(item.at)
                oracle.revoke(item.label)
                if item.label in credentials.sessions:
                    await target.revoke(credentials.sessions[item.label])
                continue
            got, expected = await _one(item, target, oracle, credentials, world)
            done += 1
            service = item.ask.service
            sensitivity = world.context(service, item.ask.path)["sensitivity"]
            for table, key in ((by_kind, item.kind), (by_sensitivity, f"{service}/{sensitivity}")):
                counts = table.setdefault(key, Counter())
                counts["requests"] += 1
                counts["expected_allowed"] += expected.allowed
            statuses[str(got[0])] += 1
            if (got[0] == 200) != expected.allowed or (not expected.allowed and got[0] != expected.status):
                by_kind[item.kind]["mismatches"] += 1
                by_sensitivity[f"{service}/{sensitivity}"]["mismatches"] += 1
                mismatches.append(Mismatch(item.index, item.kind, _describe(item), expected.allowed, expected.status,
                                           expected.why, got[0], got[1]))
            if done % 2500 == 0:
                progress(f"accuracy: {done:,}/{total:,} requests decided, {len(mismatches)} mismatches so far")
    finally:
        await world.close()
    return AccuracyResult(done, mismatches, time.perf_counter() - started, seed, quick,
                          {k: dict(v) for k, v in sorted(by_kind.items())},
                          {k: dict(v) for k, v in sorted(by_sensitivity.items())}, dict(sorted(statuses.items())))


async def _one(step: Step, target: InProcessTarget, oracle: Oracle, credentials: _Credentials,
               world: InProcessWorld) -> tuple[tuple[int, str], Expected]:
    ask = step.ask
    world.at(ask.at)  # tokens are minted at the request's own time
    headers: list[tuple[str, str]] = []
    if ask.session is not None:
        headers.append(("x-session-id", credentials.session(ask.session)))
    if ask.token is not None:
        headers.append(("authorization", f"Bearer {await credentials.token(ask.token)}"))
    request = Request(ask.service, ask.method, ask.path, ask.workload, tuple(headers), ask.source, ask.user_agent,
                      at=ask.at)
    outcome = await target.send(request)
    expected = oracle.decide(ask, capture=step.capture)
    if step.capture and outcome.allowed and outcome.session_id:
        credentials.sessions[step.capture] = outcome.session_id
    return (outcome.status if not outcome.allowed else 200, outcome.code), expected


def _describe(step: Step) -> str:
    ask = step.ask
    who = ask.workload or f"plain client {ask.source} ({ask.user_agent})"
    presented = []
    if ask.session:
        presented.append(f"session {ask.session}")
    if ask.token:
        presented.append(f"token {ask.token}")
    return (f"#{step.index} t={ask.at:.2f}s {ask.method} {ask.service}{ask.path} from {who} with "
            f"{', '.join(presented) or 'no credential'}")
