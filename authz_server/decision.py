"""The decision pipeline: facts → identity → signals → policy (cached) → Decision.

``Pipeline.decide`` is the one place where an error becomes a deny. Verifiers and
evaluators raise from the ``AuthzError`` tree; the phase that failed sets the answer
(identity 401, policy 403 or the policy's own status, malformed request 400, a dependency
down 503). Any other exception is a bug, and it denies too. Time is passed in.

Nothing here knows about gRPC or HTTP: the fronts build ``Facts`` and render ``Decision``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from .errors import AuthzError, IdentityError, PolicyError, RequestError, UnavailableError
from .facts import Facts, build_input
from .policy.cache import DecisionCache
from .policy.engine import UNDEFINED
from .policy.loader import ActivePolicy, PolicyRuntime
from .response import Headers, Verdict, read_result

log = logging.getLogger("authz_server.decision")

DECISION_ID_HEADER = "x-authz-decision-id"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, once verified. ``document`` is ``input.identity``."""

    document: Mapping[str, Any]
    fingerprint: bytes = b""  # stable digest of ``document`` (part of the cache key)
    expires_at: float | None = None  # no decision about this identity outlives it
    upstream_headers: Headers = ()  # e.g. x-authz-subject, x-authz-spiffe-id
    response_headers: Headers = ()  # to the client on allow, e.g. a new x-session-id
    headers_to_remove: tuple[str, ...] = ()  # e.g. the raw Authorization header


NO_IDENTITY = Identity({})


class IdentityResolver(Protocol):
    async def resolve(self, facts: Facts, now: float) -> Identity: ...


class SignalSource(Protocol):
    async def assess(self, facts: Facts, identity: Identity, now: float) -> Mapping[str, Any]: ...

    def record_outcome(self, facts: Facts, identity: Identity, decision: "Decision", now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class DecisionSettings:
    cache_ttl: float = 5.0  # default lifetime of a cached decision
    clock_ttl: float = 1.0  # cap for policies that read the clock (time.now_ns, JWT expiry)
    cache_max_entries: int = 100_000
    policy_timeout: float = 0.5
    deny_status: int = 403  # answer when no usable decision exists (undefined, error, timeout)
    dry_run: bool = False


@dataclass(slots=True)
class Decision:
    allowed: bool
    code: str  # "allowed", "policy_denied", or the error code that denied
    reason: str
    http_status: int
    decision_id: str
    policy_version: str = ""
    cached: bool = False
    upstream_headers: Headers = ()  # allow: added to the upstream request
    headers_to_remove: tuple[str, ...] = ()  # allow: removed from the upstream request
    response_headers: Headers = ()  # allow: added to the client's response; deny: sent with it
    body: str = ""  # deny only
    dynamic_metadata: Mapping[str, Any] | None = None
    query_parameters_to_set: Headers = ()
    query_parameters_to_remove: tuple[str, ...] = ()
    dry_run: bool = False
    would_allow: bool | None = None  # dry run: what enforcing would have answered
    identity: Mapping[str, Any] = field(default_factory=dict)
    signals: Mapping[str, Any] = field(default_factory=dict)
    input: dict[str, Any] | None = None  # built only when the policy ran
    result: Any = None  # the raw policy value, for the audit log
    phase: str = "policy"  # what set the answer: policy, request, identity, unavailable, internal


@dataclass(frozen=True, slots=True)
class _CachedVerdict:
    verdict: Verdict
    result: Any


def new_decision_id() -> str:
    return os.urandom(16).hex()


class Pipeline:
    """Wires the phases; everything it uses is passed in (see ``server.build_pipeline``)."""

    def __init__(self, policies: PolicyRuntime, *, settings: DecisionSettings | None = None,
                 identity: IdentityResolver | None = None, signals: SignalSource | None = None,
                 observers: list[Callable[[Decision, Facts | None, float], None]] | None = None) -> None:
        self.policies = policies
        self.settings = settings or DecisionSettings()
        self.identity = identity
        self.signals = signals
        self.observers = observers if observers is not None else []
        self.cache: DecisionCache[_CachedVerdict] = DecisionCache(self.settings.cache_max_entries)
        self._cached_version = ""

    async def decide(self, facts: Facts, *, now: float) -> Decision:
        decision_id = new_decision_id()
        active = self.policies.active
        identity = NO_IDENTITY
        signals: Mapping[str, Any] = {}
        try:
            if active is None:
                raise PolicyError("no policy loaded yet", code="policy_not_loaded")
            if self.identity is not None:
                identity = await self.identity.resolve(facts, now)
            if self.signals is not None:
                signals = await self.signals.assess(facts, identity, now)
            decision = await self._decide_with_policy(active, facts, identity, signals, decision_id, now)
        except AuthzError as exc:
            decision = self._error_decision(exc, decision_id, active, identity, signals)
        except Exception as exc:  # a bug must never allow
            log.exception("unexpected error while deciding %s", decision_id)
            decision = self._error_decision(
                AuthzError(f"internal error: {type(exc).__name__}", code="internal_error"),
                decision_id, active, identity, signals)
        if self.settings.dry_run and decision.phase != "request":
            decision = _as_dry_run(decision)
        if self.signals is not None:
            self.signals.record_outcome(facts, identity, decision, now)
        for observe in self.observers:
            observe(decision, facts, now)
        return decision

    def refuse(self, error: AuthzError, *, now: float) -> Decision:
        """A request that could not even be read: denied without asking the policy (also in
        dry-run mode, as OPA-Envoy does)."""
        decision = self._error_decision(error, new_decision_id(), self.policies.active, NO_IDENTITY, {})
        for observe in self.observers:
            observe(decision, None, now)
        return decision

    async def _decide_with_policy(self, active: ActivePolicy, facts: Facts, identity: Identity,
                                  signals: Mapping[str, Any], decision_id: str, now: float) -> Decision:
        if active.version != self._cached_version:
            self.cache.clear()  # a new policy or data version: nothing cached still holds
            self._cached_version = active.version
        document: dict[str, Any] | None = None
        use_cache = active.cache.enabled and self.settings.cache_max_entries > 0
        key = b""
        if use_cache:
            if active.cache.key_paths:
                document = build_input(facts, identity.document, signals)
                key = _narrow_key(active, document)
            else:
                key = _full_key(active, facts, identity, signals)
            cached = self.cache.get(key, now)
            if cached is not None:
                return self._render(cached.verdict, cached.result, decision_id, active, identity, signals,
                                    None, cached=True)
        if document is None:
            document = build_input(facts, identity.document, signals)
        result = await active.evaluate(document, timeout=self.settings.policy_timeout)
        if result is UNDEFINED:
            raise PolicyError("the policy decision is undefined", code="policy_undefined")
        verdict = read_result(result)
        if use_cache:
            self.cache.put(key, _CachedVerdict(verdict, result), self._deadline(active, facts, identity, now), now)
        return self._render(verdict, result, decision_id, active, identity, signals, document, cached=False)

    def _deadline(self, active: ActivePolicy, facts: Facts, identity: Identity, now: float) -> float:
        ttl = active.cache.ttl if active.cache.ttl is not None else self.settings.cache_ttl
        if active.reads_clock:
            ttl = min(ttl, self.settings.clock_ttl)
            token_exp = _bearer_expiry(facts)
            if token_exp is not None:
                ttl = min(ttl, token_exp - now)
        deadline = now + ttl
        if identity.expires_at is not None:
            deadline = min(deadline, identity.expires_at)
        return deadline

    def _render(self, verdict: Verdict, result: Any, decision_id: str, active: ActivePolicy, identity: Identity,
                signals: Mapping[str, Any], document: dict[str, Any] | None, *, cached: bool) -> Decision:
        id_header = ((DECISION_ID_HEADER, decision_id),)
        if verdict.allowed:
            return Decision(
                allowed=True, code="allowed", reason="allowed by policy", http_status=200,
                decision_id=decision_id, policy_version=active.version, cached=cached,
                upstream_headers=identity.upstream_headers + verdict.headers + id_header,
                headers_to_remove=identity.headers_to_remove + verdict.request_headers_to_remove,
                response_headers=identity.response_headers + verdict.response_headers_to_add,
                dynamic_metadata=verdict.dynamic_metadata,
                query_parameters_to_set=verdict.query_parameters_to_set,
                query_parameters_to_remove=verdict.query_parameters_to_remove,
                identity=identity.document, signals=signals, input=document, result=result,
            )
        headers = verdict.headers
        body = verdict.body
        if not body and not any(name.lower() == "content-type" for name, _ in headers):
            body = _error_body("policy_denied", "denied by policy", decision_id)
            headers = headers + (("content-type", "application/json"),)
        return Decision(
            allowed=False, code="policy_denied", reason="denied by policy", http_status=verdict.http_status,
            decision_id=decision_id, policy_version=active.version, cached=cached,
            response_headers=headers + id_header, body=body, dynamic_metadata=verdict.dynamic_metadata,
            identity=identity.document, signals=signals, input=document, result=result,
        )

    def _error_decision(self, error: AuthzError, decision_id: str, active: ActivePolicy | None,
                        identity: Identity, signals: Mapping[str, Any]) -> Decision:
        phase = _phase(error)
        status = self.settings.deny_status if phase in ("policy", "internal") else error.status
        headers: Headers = (("content-type", "application/json"), (DECISION_ID_HEADER, decision_id))
        if isinstance(error, IdentityError):
            headers += (("www-authenticate", f'Bearer error="invalid_token", error_description="{error.code}"'),)
        return Decision(
            allowed=False, code=error.code, reason=error.message, http_status=status, decision_id=decision_id,
            phase=phase,
            policy_version=active.version if active is not None else "", response_headers=headers,
            body=_error_body(error.code, error.message, decision_id), identity=identity.document, signals=signals,
        )


def _phase(error: AuthzError) -> str:
    for kind, phase in ((RequestError, "request"), (IdentityError, "identity"), (UnavailableError, "unavailable"),
                        (PolicyError, "policy")):
        if isinstance(error, kind):
            return phase
    return "internal"


def _error_body(code: str, message: str, decision_id: str) -> str:
    return json.dumps({"error": code, "message": message, "decision_id": decision_id}, separators=(",", ":"))


def _as_dry_run(decision: Decision) -> Decision:
    """OPA-Envoy's dry-run: record what would have been decided, allow the request."""
    if decision.allowed:
        decision.dry_run = True
        decision.would_allow = True
        return decision
    return Decision(
        allowed=True, code=decision.code, reason=f"dry run: would deny ({decision.reason})", http_status=200,
        decision_id=decision.decision_id, policy_version=decision.policy_version, cached=decision.cached,
        upstream_headers=((DECISION_ID_HEADER, decision.decision_id),), dry_run=True, would_allow=False,
        identity=decision.identity, signals=decision.signals, input=decision.input, result=decision.result,
    )


def _full_key(active: ActivePolicy, facts: Facts, identity: Identity, signals: Mapping[str, Any]) -> bytes:
    h = hashlib.blake2b(active.key_prefix, digest_size=20)
    h.update(facts.fingerprint)
    h.update(b"\x00" + identity.fingerprint)
    if signals:
        h.update(b"\x00" + json.dumps(signals, sort_keys=True, separators=(",", ":")).encode())
    return h.digest()


def _narrow_key(active: ActivePolicy, document: Mapping[str, Any]) -> bytes:
    values = [_lookup(document, path) for path in active.cache.key_paths]
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(active.key_prefix + b"\x01" + blob, digest_size=20).digest()


_MISSING = {"__missing__": True}


def _lookup(document: Mapping[str, Any], path: str) -> Any:
    node: Any = document
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _bearer_expiry(facts: Facts) -> float | None:
    """The ``exp`` of a bearer JWT the policy may check itself (read unverified: it only
    shortens how long a decision is cached)."""
    header = facts.header("authorization")
    if not header[:7].lower() == "bearer ":
        return None
    parts = header[7:].strip().split(".")
    if len(parts) != 3 or len(parts[1]) > 16384:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
    except (ValueError, TypeError):
        return None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
