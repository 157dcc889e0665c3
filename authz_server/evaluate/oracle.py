"""The intended access matrix, stated independently of the Rego policy.

Written from what the project documents — the comments of ``policies/authz.rego``, the README
("Identity and sessions", "Adaptive policy: signals") and ``docs/signals.md`` — not from the
Rego rules: the route table (``policies/data.yaml``) is read as data, everything else is said
here in plain Python. The accuracy run (``accuracy.py``) asks this oracle and the real pipeline
the same questions and reports every disagreement.

What a request must get through, in order:

1. **Failed sign-ins.** A source (its workload, else its address) that failed to authenticate more
   often than its budget allows is refused outright, 429, for as long as the budget needs to
   allow one more failure.
2. **Identity** (401 when it cannot be established). A workload is the SPIFFE ID its mTLS
   certificate proves, from a trusted trust domain. A user is known by a session id (a session
   that exists and is not revoked) or by a bearer token from a trusted issuer (valid signature
   with an allowed algorithm, not expired, for our audience). A session is bound to the client
   that created it: presented by another client it is the presenter acting for the user when the
   presenter is a configured delegation actor (at most ``max_hops`` actors), and stolen
   otherwise. A token is refused when it was first used by another client (replay), and a token
   obtained by token exchange is bound to the certificate of the workload it was issued to.
   Presenting a token (not a session) creates a session bound to the presenting client.
3. **Threat lists** (403): a listed user, workload or client address.
4. **Rate** (429): each identity (the user by issuer and subject, else the workload, else the
   client address) has a token bucket; a request past it is refused.
5. **Access** (403 otherwise). The service's most specific route whose prefix the path starts
   with governs (the prefix is Envoy's: a plain string prefix); the method must be one it lists.
   What the route demands depends on its sensitivity:

   * ``low``: a verified user calling for themselves, or a workload acting for the user that the
     route lists in ``delegates``, on a route open to ``users``;
   * ``medium``: the same, or a workload the route lists in ``callers``;
   * ``high``: a workload the route lists in ``callers``, acting for a user with a credential
     bound to that very workload — a session it owns, or a token exchanged for it (RFC 8693,
     bound to its certificate) for this service. Not a bare user token, and not a session
     presented on someone else's behalf.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .model import DELEGATION_ACTORS, THREAT_NETWORK, THREAT_SUBJECTS, THREAT_WORKLOADS, TRUSTED_DOMAINS

# Token defects the oracle knows by name; any of them makes a token worthless.
TOKEN_DEFECTS = ("expired", "forged", "alg_none", "alg_confusion", "wrong_audience", "untrusted_issuer")
GUESSED = "guessed"  # a session id nobody was ever given


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    methods: frozenset[str]
    sensitivity: str
    users: bool = False
    callers: frozenset[str] = frozenset()
    delegates: frozenset[str] = frozenset()


def load_route_table(policies: Path) -> dict[str, tuple[Route, ...]]:
    """``services.<name>.routes`` of the policy data, as the oracle's own values."""
    data = yaml.safe_load((policies / "data.yaml").read_text()) or {}
    table: dict[str, tuple[Route, ...]] = {}
    for service, entry in (data.get("services") or {}).items():
        table[service] = tuple(
            Route(str(r["prefix"]), frozenset(r.get("methods", ())), str(r.get("sensitivity", "medium")),
                  bool(r.get("users", False)), frozenset(r.get("callers", ())), frozenset(r.get("delegates", ())))
            for r in entry.get("routes", ()))
    return table


@dataclass(frozen=True, slots=True)
class TokenFacts:
    """A bearer token as the oracle sees it: whose, what kind, and what is wrong with it."""

    subject: str
    kind: str = "user"  # "user": from the trusted provider; "exchanged": from authz-server's token exchange
    defect: str = ""  # one of TOKEN_DEFECTS, or "" for a sound token
    actor: str = ""  # exchanged: the workload it was issued to (bound to its certificate)
    audience: str = ""  # exchanged: the one service it is for

    @property
    def issuer(self) -> str:
        return "exchange" if self.kind == "exchanged" else "provider"


@dataclass(frozen=True, slots=True)
class Ask:
    """One request in the oracle's terms. ``session``/``token`` are labels the traffic gives
    credentials (the oracle never sees the secrets themselves)."""

    service: str
    method: str
    path: str
    workload: str | None
    source: str
    user_agent: str
    at: float
    session: str | None = None
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Expected:
    allowed: bool
    status: int
    why: str


@dataclass(frozen=True, slots=True)
class Bucket:
    rate: float  # per second
    burst: float


@dataclass(frozen=True)
class OracleSettings:
    trusted_domains: tuple[str, ...] = TRUSTED_DOMAINS
    delegation_actors: tuple[str, ...] = DELEGATION_ACTORS
    max_hops: int = 2
    rate: Bucket | None = None  # per identity
    failures: Bucket | None = None  # failed sign-ins per source
    threat_subjects: tuple[str, ...] = THREAT_SUBJECTS
    threat_workloads: tuple[str, ...] = THREAT_WORKLOADS
    threat_networks: tuple[str, ...] = (THREAT_NETWORK,)


@dataclass(slots=True)
class _Session:
    subject: str
    issuer: str
    owner: str | None  # the workload that created it, None for a client without a certificate
    chain: tuple[str, ...]  # actors acting for the user, oldest first
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class _Who:
    workload: str | None
    subject: str | None = None
    issuer: str = ""
    chain: tuple[str, ...] = ()
    owned_by_caller: bool = False  # the user credential is bound to the presenting workload itself
    exchanged_for: str = ""  # a token exchanged for the presenter, naming this service


class _Allowance:
    """A token bucket per key: ``burst`` to start with, refilled at ``rate`` per second."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.state: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> tuple[bool, float]:
        """(taken, seconds until one token is back)."""
        level, last = self.state.get(key, (self.bucket.burst, now))
        level = min(self.bucket.burst, level + max(now - last, 0.0) * self.bucket.rate)
        if level >= 1.0:
            self.state[key] = (level - 1.0, now)
            return True, 0.0
        self.state[key] = (level, now)
        return False, (1.0 - level) / self.bucket.rate


@dataclass
class Oracle:
    """Stateful: it remembers the sessions it expects clients to hold, who used which token
    first, and every bucket, so it must see the requests in the order they were sent."""

    routes: Mapping[str, tuple[Route, ...]]
    settings: OracleSettings = field(default_factory=OracleSettings)
    tokens: dict[str, TokenFacts] = field(default_factory=dict)
    _sessions: dict[str, _Session] = field(default_factory=dict)
    _first_use: dict[str, str] = field(default_factory=dict)
    _locked: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rate = _Allowance(self.settings.rate) if self.settings.rate else None
        self._failures = _Allowance(self.settings.failures) if self.settings.failures else None
        self._networks = [ipaddress.ip_network(n) for n in self.settings.threat_networks]

    # -- what the traffic tells the oracle
    def know_token(self, label: str, facts: TokenFacts) -> None:
        self.tokens[label] = facts

    def revoke(self, label: str) -> None:
        if label in self._sessions:
            self._sessions[label].revoked = True

    def holds(self, label: str) -> bool:
        return label in self._sessions

    # -- the decision
    def decide(self, ask: Ask, *, capture: str | None = None) -> Expected:
        source = ask.workload or ask.source
        if self._locked.get(source, 0.0) > ask.at:
            return Expected(False, 429, "source locked out after too many failed sign-ins")
        who, failure, new_session = self._identify(ask)
        if failure:
            self._failed(source, ask.at)
            return Expected(False, 401, failure)
        assert who is not None
        expected = self._after_identity(ask, who)
        if capture and expected.allowed and new_session is not None:
            self._sessions[capture] = new_session
        return expected

    def _after_identity(self, ask: Ask, who: _Who) -> Expected:
        listed = self._threat(ask, who)
        if listed:
            return Expected(False, 403, f"threat-listed {listed}")
        if self._rate is not None:
            key = f"user:{who.issuer}|{who.subject}" if who.subject else (
                f"workload:{who.workload}" if who.workload else f"ip:{ask.source}")
            if not self._rate.take(key, ask.at)[0]:
                return Expected(False, 429, f"over the rate limit of {key}")
        return self._access(ask, who)

    def _failed(self, source: str, now: float) -> None:
        if self._failures is None:
            return
        taken, wait = self._failures.take(source, now)
        if not taken:
            self._locked[source] = now + max(wait, 1.0 / self._failures.bucket.rate)

    # -- 2. identity
    def _identify(self, ask: Ask) -> tuple[_Who | None, str, _Session | None]:
        """(who, why identification failed or "", the session a token presentation creates)."""
        workload = ask.workload
        if workload is not None:
            domain = workload.removeprefix("spiffe://").split("/", 1)[0]
            if domain not in self.settings.trusted_domains:
                return None, f"workload from untrusted trust domain {domain}", None
        if ask.session is not None:
            return self._by_session(ask)
        if ask.token is not None:
            return self._by_token(ask)
        return _Who(workload), "", None

    def _by_session(self, ask: Ask) -> tuple[_Who | None, str, _Session | None]:
        assert ask.session is not None
        session = self._sessions.get(ask.session)
        if session is None:
            return None, "unknown session", None
        if session.revoked:
            return None, "revoked session", None
        if session.owner == ask.workload:
            return _Who(ask.workload, session.subject, session.issuer, session.chain,
                        owned_by_caller=ask.workload is not None), "", None
        if ask.workload is not None and ask.workload in self.settings.delegation_actors:
            chain = (*session.chain, ask.workload)
            if len(chain) > self.settings.max_hops:
                return None, "delegation chain too long", None
            return _Who(ask.workload, session.subject, session.issuer, chain), "", None
        owner, presenter = session.owner or "a plain client", ask.workload or "a plain client"
        return None, f"session of {owner} presented by {presenter}", None

    def _by_token(self, ask: Ask) -> tuple[_Who | None, str, _Session | None]:
        assert ask.token is not None
        token = self.tokens[ask.token]
        if token.defect:
            return None, f"{token.defect} token", None
        if token.kind == "exchanged" and ask.workload != token.actor:
            return None, "exchanged token presented without the certificate it is bound to", None
        client = ask.workload or f"{ask.source}|{ask.user_agent}"
        first = self._first_use.setdefault(ask.token, client)
        if first != client:
            return None, f"token replayed (first used by {first})", None
        chain = (token.actor,) if token.kind == "exchanged" else ()
        who = _Who(ask.workload, token.subject, token.issuer, chain, owned_by_caller=False,
                   exchanged_for=token.audience if token.kind == "exchanged" else "")
        return who, "", _Session(token.subject, token.issuer, ask.workload, chain)

    # -- 3. threat lists
    def _threat(self, ask: Ask, who: _Who) -> str:
        if who.subject and who.subject in self.settings.threat_subjects:
            return f"user {who.subject}"
        if who.workload and who.workload in self.settings.threat_workloads:
            return f"workload {who.workload}"
        try:
            address = ipaddress.ip_address(ask.source)
        except ValueError:
            return ""
        if any(address in network for network in self._networks):
            return f"address {ask.source}"
        return ""

    # -- 5. access
    def _access(self, ask: Ask, who: _Who) -> Expected:
        routes = self.routes.get(ask.service)
        if not routes:
            return Expected(False, 403, f"no service {ask.service} in the route table")
        path = ask.path.split("?", 1)[0]
        candidates = [r for r in routes if path.startswith(r.prefix)]
        if not candidates:
            return Expected(False, 403, "no route covers the path")
        route = max(candidates, key=lambda r: len(r.prefix))
        if ask.method not in route.methods:
            return Expected(False, 403, f"{route.prefix} does not allow {ask.method}")
        if self._strong_enough(ask, who, route):
            return Expected(True, 200, f"{route.sensitivity} route {route.prefix}")
        return Expected(False, 403, f"identity too weak for the {route.sensitivity} route {route.prefix}")

    @staticmethod
    def _strong_enough(ask: Ask, who: _Who, route: Route) -> bool:
        for_user = who.subject is not None and route.users and (not who.chain or who.chain[-1] in route.delegates)
        listed = who.workload is not None and who.workload in route.callers
        if route.sensitivity == "low":
            return for_user
        if route.sensitivity == "medium":
            return for_user or listed
        # high (and anything unknown, which must never be weaker)
        bound_to_caller = who.owned_by_caller or who.exchanged_for == ask.service
        return listed and who.subject is not None and bound_to_caller


def describe_settings(settings: OracleSettings) -> dict[str, Any]:
    return {"trusted_domains": list(settings.trusted_domains), "delegation_actors": list(settings.delegation_actors),
            "rate": asdict(settings.rate) if settings.rate else None,
            "failures": asdict(settings.failures) if settings.failures else None}
