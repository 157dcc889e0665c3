"""Generated traffic for the accuracy run: who calls what, with which credential, when.

Credentials are named by labels (``tok:…`` tokens, ``s:…`` sessions); the run turns them into real
tokens and session ids (``accuracy.py``), the oracle reasons about their labels. The mix covers
every identity method — none, a user's session, a bare JWT, an mTLS workload alone, delegation,
an exchanged token — plus stolen sessions, replayed and broken tokens, guessed and revoked
session ids, untrusted and threat-listed callers and bursts over the rate limit, at every
service (and one that does not exist), on every route, near misses of routes, and methods no
route allows. Paths are already normalised, as Envoy hands them to the check (path tricks are
an attack of their own, run through a real Envoy).

Seeded: the same count and seed give the same traffic.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field
from typing import Iterator

from .model import AUDITOR, EXCHANGE_AUDIENCE, FRONTEND, INTRUDER, ORDERS, PAYMENTS, SCANNER
from .oracle import GUESSED, TOKEN_DEFECTS, Ask, Route, TokenFacts

USERS = ("alice", "bob", "carol", "dave", "erin", "grace", "heidi", "ivan")
LISTED_USER = "mallory"  # on the threat list
LISTED_SOURCE = "10.66.6.7"  # an address on the threat list
SERVICE_WORKLOADS = (FRONTEND, ORDERS, PAYMENTS)
OTHER_WORKLOADS = (AUDITOR, SCANNER)
EXTRA_SERVICE = "billing"  # a service the route table does not know
COMMON_METHODS = ("GET", "POST")
OTHER_METHODS = ("PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
STEP_SECONDS = 0.05  # 20 requests per simulated second in all


@dataclass(frozen=True, slots=True)
class Step:
    """One request, as the oracle is asked about it (``ask.at``: seconds from the start of the
    run). ``capture``: remember the session id the answer hands out under this label."""

    index: int
    kind: str  # the identity method or attack class, for the report
    ask: Ask
    capture: str | None = None


@dataclass(frozen=True, slots=True)
class Revoke:
    """An operator revokes the session known by ``label`` at ``at``."""

    label: str
    at: float


@dataclass
class Traffic:
    items: list[Step | Revoke] = field(default_factory=list)
    tokens: dict[str, TokenFacts] = field(default_factory=dict)
    exchanged_from: dict[str, str] = field(default_factory=dict)  # exchanged token label → the user token label

    @property
    def requests(self) -> int:
        return sum(1 for item in self.items if isinstance(item, Step))

    def steps(self) -> Iterator[Step]:
        return (item for item in self.items if isinstance(item, Step))


def browser(user: str) -> tuple[str, str]:
    """A user's browser: its address and user agent."""
    index = (USERS + (LISTED_USER,)).index(user) if user in USERS + (LISTED_USER,) else 99
    return f"10.0.1.{10 + index}", f"browser/{user}"


class _Generator:
    def __init__(self, routes: dict[str, tuple[Route, ...]], seed: int) -> None:
        self.routes = routes
        self.rng = random.Random(seed)
        self.traffic = Traffic()
        self.clock = 0.0
        self.fresh = 0
        self.used_tokens: list[tuple[str, str | None, str, str]] = []  # (label, workload, source, agent)
        self.sessions: dict[str, tuple[str, str | None]] = {}  # label -> (user, owner workload or None)

    # -- building blocks
    def step(self, kind: str, service: str, method: str, path: str, workload: str | None, *, source: str = "",
             agent: str = "", session: str | None = None, token: str | None = None, capture: str | None = None,
             same_instant: bool = False) -> None:
        if not same_instant:
            self.clock += STEP_SECONDS
        if not source:
            source = "10.0.2.1" if workload else "10.0.3.1"
        agent = agent or ("sidecar/1" if workload else "curl/8")
        index = len(self.traffic.items)
        self.traffic.items.append(Step(index, kind, Ask(service, method, path, workload, source, agent, self.clock,
                                                        session, token), capture))

    def token(self, facts: TokenFacts) -> str:
        self.fresh += 1
        label = f"tok:{facts.subject}:{facts.kind}:{facts.defect or 'ok'}:{self.fresh}"
        self.traffic.tokens[label] = facts
        return label

    def exchanged(self, user: str, actor: str = ORDERS, audience: str = EXCHANGE_AUDIENCE) -> str:
        subject_token = self.token(TokenFacts(user))
        label = self.token(TokenFacts(user, "exchanged", actor=actor, audience=audience))
        self.traffic.exchanged_from[label] = subject_token
        return label

    def path_for(self, service: str) -> str:
        routes = self.routes.get(service, ())
        rng = self.rng
        if routes and rng.random() < 0.75:
            prefix = rng.choice(routes).prefix
            base = prefix.rstrip("/")
            shapes = [prefix, f"{base}/{rng.randint(1, 9999)}", f"{prefix}?page={rng.randint(1, 5)}",
                      f"{base}/{rng.randint(1, 99)}/items", f"{base}X" if base else "/X"]
            return rng.choice(shapes)
        return rng.choice(["/", "/admin", "/internal/metrics", "/payments", "/orders", "/account", "/refunds/7",
                           "/debug/pprof", "/order", "/pay"])

    def target(self) -> tuple[str, str, str]:
        rng = self.rng
        service = rng.choices(["frontend", "orders", "payments", EXTRA_SERVICE], [4, 4, 4, 1])[0]
        method = rng.choice(COMMON_METHODS) if rng.random() < 0.72 else rng.choice(OTHER_METHODS)
        return service, method, self.path_for(service)

    def session_label(self, user: str, owner: str | None, via: str = "") -> str:
        name = owner.rsplit("/", 1)[-1] if owner else "browser"
        return f"s:{user}@{name}{via}"

    # -- sign-ins: a token presented once, the session captured
    def sign_in_browser(self, user: str) -> str:
        label = self.session_label(user, None)
        source, agent = browser(user)
        self.step("bare_jwt", "frontend", "GET", "/", None, source=source, agent=agent,
                  token=self.token(TokenFacts(user)), capture=label)
        self.sessions[label] = (user, None)
        return label

    def sign_in_workload(self, user: str, workload: str) -> str:
        label = self.session_label(user, workload)
        self.step("bare_jwt", "orders", "GET", "/orders", workload, token=self.token(TokenFacts(user)), capture=label)
        self.sessions[label] = (user, workload)
        return label

    def sign_in_exchanged(self, user: str) -> str:
        label = self.session_label(user, ORDERS, "-x")
        self.step("exchanged", "payments", "POST", "/payments", ORDERS, token=self.exchanged(user), capture=label)
        self.sessions[label] = (user, ORDERS)
        return label

    # -- the mix
    def setup(self) -> None:
        for user in USERS + (LISTED_USER,):
            self.sign_in_browser(user)
        for user in USERS[:6]:
            self.sign_in_workload(user, FRONTEND)
            self.sign_in_workload(user, ORDERS)
            self.sign_in_exchanged(user)

    def own_session(self) -> None:
        label = self.rng.choice(sorted(self.sessions))
        user, owner = self.sessions[label]
        service, method, path = self.target()
        if owner is None:
            source, agent = browser(user)
            self.step("session", service, method, path, None, source=source, agent=agent, session=label)
        else:
            self.step("session", service, method, path, owner, session=label)

    def delegated(self) -> None:
        label = self.rng.choice(sorted(self.sessions))
        _user, owner = self.sessions[label]
        if owner == FRONTEND:
            return self.own_session()
        service, method, path = self.target()
        self.step("delegation", service, method, path, FRONTEND, session=label)

    def stolen(self) -> None:
        label = self.rng.choice(sorted(self.sessions))
        user, owner = self.sessions[label]
        thieves = [w for w in (ORDERS, PAYMENTS, AUDITOR) if w != owner] + ([None] if owner else [])
        thief = self.rng.choice(thieves)
        service, method, path = self.target()
        if thief is None:
            source, agent = browser(self.rng.choice(USERS))
            self.step("stolen_session", service, method, path, None, source=source, agent=agent, session=label)
        else:
            self.step("stolen_session", service, method, path, thief, session=label)

    def bare_jwt(self) -> None:
        rng = self.rng
        user = rng.choice(USERS)
        client = rng.choice([None, None, FRONTEND, ORDERS, ORDERS, PAYMENTS, AUDITOR])
        label = self.token(TokenFacts(user))
        service, method, path = self.target()
        if client is None:
            source, agent = browser(user)
        else:
            source, agent = "10.0.2.1", "sidecar/1"
        self.step("bare_jwt", service, method, path, client, source=source, agent=agent, token=label)
        self.used_tokens.append((label, client, source, agent))

    def reused_jwt(self) -> None:
        if not self.used_tokens:
            return self.bare_jwt()
        label, client, source, agent = self.rng.choice(self.used_tokens)
        service, method, path = self.target()
        self.step("bare_jwt", service, method, path, client, source=source, agent=agent, token=label)

    def replayed_jwt(self) -> None:
        if not self.used_tokens:
            return self.bare_jwt()
        label, client, _source, _agent = self.rng.choice(self.used_tokens)
        others = [w for w in (None, FRONTEND, ORDERS, PAYMENTS) if w != client]
        thief = self.rng.choice(others)
        service, method, path = self.target()
        if thief is None:
            source, agent = f"10.0.4.{self.rng.randint(1, 200)}", "thief/1"
            self.step("replay", service, method, path, None, source=source, agent=agent, token=label)
        else:
            self.step("replay", service, method, path, thief, token=label)

    def exchanged_token(self) -> None:
        rng = self.rng
        label = self.exchanged(rng.choice(USERS))
        presenter = rng.choice([ORDERS, ORDERS, ORDERS, FRONTEND])
        service = rng.choice(["payments", "payments", "orders", "frontend"])
        method = rng.choice(COMMON_METHODS) if rng.random() < 0.8 else rng.choice(OTHER_METHODS)
        self.step("exchanged", service, method, self.path_for(service), presenter, token=label)

    def broken_token(self) -> None:
        rng = self.rng
        defect = rng.choice(TOKEN_DEFECTS)
        label = self.token(TokenFacts(rng.choice(USERS), defect=defect))
        service, method, path = self.target()
        client = rng.choice([None, None, FRONTEND, ORDERS])
        source = f"10.0.9.{rng.randint(1, 250)}" if client is None else "10.0.2.1"
        self.step("invalid_token", service, method, path, client, source=source, token=label)

    def workload_alone(self) -> None:
        service, method, path = self.target()
        self.step("mtls", service, method, path, self.rng.choice(SERVICE_WORKLOADS + (AUDITOR,)))

    def nobody(self) -> None:
        service, method, path = self.target()
        self.step("none", service, method, path, None, source=f"10.0.5.{self.rng.randint(1, 250)}")

    def guessed(self) -> None:
        service, method, path = self.target()
        client = self.rng.choice([None, ORDERS])
        self.step("guessed_session", service, method, path, client,
                  source=f"10.0.6.{self.rng.randint(1, 250)}" if client is None else "", session=GUESSED)

    def untrusted(self) -> None:
        service, method, path = self.target()
        credential = self.rng.choice(["none", "session", "token"])
        session = self.rng.choice(sorted(self.sessions)) if credential == "session" else None
        token = self.token(TokenFacts(self.rng.choice(USERS))) if credential == "token" else None
        self.step("untrusted_domain", service, method, path, INTRUDER, session=session, token=token)

    def threat_listed(self) -> None:
        rng = self.rng
        service, method, path = self.target()
        choice = rng.choice(["user", "workload", "address"])
        if choice == "user":
            source, agent = browser(LISTED_USER)
            self.step("threat_listed", service, method, path, None, source=source, agent=agent,
                      token=self.token(TokenFacts(LISTED_USER)))
        elif choice == "workload":
            self.step("threat_listed", service, method, path, SCANNER)
        else:
            self.step("threat_listed", "frontend", "GET", "/", None, source=LISTED_SOURCE, agent="browser/trudy",
                      token=self.token(TokenFacts("trudy")))

    def revoked(self) -> None:
        user = self.rng.choice(USERS)
        label = f"s:{user}@browser-r{self.fresh}"
        source, agent = browser(user)
        self.step("bare_jwt", "frontend", "GET", "/", None, source=source, agent=agent,
                  token=self.token(TokenFacts(user)), capture=label)
        self.traffic.items.append(Revoke(label, self.clock))
        for _ in range(2):
            service, method, path = self.target()
            self.step("revoked_session", service, method, path, None, source=source, agent=agent, session=label)

    def flood(self, count: int) -> None:
        """One identity sends ``count`` requests at the same instant: past the rate limit."""
        label = self.rng.choice([k for k, (_u, owner) in self.sessions.items() if owner is None])
        user, _owner = self.sessions[label]
        source, agent = browser(user)
        self.clock += 5.0  # a fresh bucket: only this burst counts
        for i in range(count):
            self.step("flood", "frontend", "GET", "/", None, source=source, agent=agent, session=label,
                      same_instant=i > 0)
        self.clock += 5.0

    def stuffing(self, count: int) -> None:
        """One source tries guessed session ids, then a real user's token: locked out."""
        source = f"10.0.7.{self.rng.randint(1, 250)}"
        for _ in range(count):
            self.step("credential_stuffing", "frontend", "GET", "/account", None, source=source,
                      agent="stuffer/1", session=GUESSED, same_instant=False)
        self.step("credential_stuffing", "frontend", "GET", "/", None, source=source, agent="stuffer/1",
                  token=self.token(TokenFacts(self.rng.choice(USERS))))


MIX = (("own_session", 28), ("delegated", 12), ("stolen", 5), ("bare_jwt", 8), ("reused_jwt", 3),
       ("replayed_jwt", 4), ("exchanged_token", 5), ("broken_token", 6), ("workload_alone", 12), ("nobody", 5),
       ("guessed", 2), ("untrusted", 2), ("threat_listed", 3), ("revoked", 1))


def generate(routes: dict[str, tuple[Route, ...]], *, count: int, seed: int = 8, flood_every: int = 2500,
             flood_size: int = 60, stuffing_every: int = 5000, stuffing_size: int = 30) -> Traffic:
    """At least ``count`` requests (a few more when the last scenario needs several)."""
    gen = _Generator(routes, seed)
    gen.setup()
    names = [name for name, _ in MIX]
    weights = [weight for _, weight in MIX]
    next_flood, next_stuffing = flood_every // 2, stuffing_every // 2
    while gen.traffic.requests < count:
        done = gen.traffic.requests
        if done >= next_flood:
            gen.flood(flood_size)
            next_flood += flood_every
        elif done >= next_stuffing:
            gen.stuffing(stuffing_size)
            next_stuffing += stuffing_every
        else:
            getattr(gen, gen.rng.choices(names, weights)[0])()
    return gen.traffic


def guessed_session_id() -> str:
    """Well-formed (43 base64url characters) and never handed out."""
    return secrets.token_urlsafe(32)[:43]
