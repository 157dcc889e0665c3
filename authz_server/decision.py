"""The decision pipeline: facts → identity → signals → policy (cached) → Decision.

``Pipeline.decide`` is the one place where an error becomes a deny. Verifiers and
evaluators raise from the ``AuthzError`` tree; the phase that failed sets the answer
(identity 401, policy 403 or the policy's own status, malformed request 400, a dependency
down 503). Any other exception is a bug, and it denies too. Time is passed in.

Nothing here knows about gRPC or HTTP: the fronts build ``Facts`` and render ``Decision``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from .decisioncache import BearerExpiry, DecisionCache, ReadKeys, full_key, narrow_key, read_key
from .errors import AuthzError, IdentityError, PolicyError, RequestError, UnavailableError, where_it_failed
from .facts import Facts, build_input
from .identity.verified import NO_IDENTITY, Identity
from .policy.engine import UNDEFINED, Traced, encode_input
from .policy.loader import ActivePolicy, PolicyRuntime
from .response import Headers, Verdict, read_result
from .trees import project, without

log = logging.getLogger("authz_server.decision")

DECISION_ID_HEADER = "x-authz-decision-id"


class IdentityResolver(Protocol):
    async def resolve(self, facts: Facts, now: float) -> Identity: ...


class PhaseClock(Protocol):
    """Notes when each phase of one decision ended (tracing: see ``tracing.spans``)."""

    def mark(self, phase: str, detail: Any = None) -> None: ...


class DecisionTracing(Protocol):
    def start(self, facts: Facts) -> PhaseClock:
        """The clock of a decision about to be made (one that notes nothing when its span will
        not be kept: the sampler decides from the request, here)."""


class ExplainTicket(Protocol):
    """One decision to explain (see ``explaining``): evaluated with OPA's trace, bypassing the cache."""

    mode: str
    explanation: Mapping[str, Any] | None

    def explain(self, traced: Traced, document: Mapping[str, Any] | None, modules: Mapping[str, str]) -> None: ...


class Explaining(Protocol):
    def claim(self, identity: Mapping[str, Any], path: str, now: float) -> ExplainTicket | None: ...

    def wants(self, identity: Mapping[str, Any], path: str, now: float) -> bool: ...


class SignalSource(Protocol):
    def gate(self, facts: Facts, now: float) -> None: ...

    async def record_identity_failure(self, facts: Facts, now: float) -> None: ...

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
    explain_policy_denies: bool = False  # deny_body: explain (our JSON body on policy denies too)


_JSON = (("content-type", "application/json"),)


@dataclass(slots=True, kw_only=True)
class Decision:
    """The answer to one request. The fronts render it; the decision-id header is theirs
    to add, so a cached allow can share one rendering (``memo``) across requests."""

    allowed: bool
    code: str  # "allowed", "policy_denied", or the error code that denied
    reason: str
    http_status: int
    decision_id: str
    phase: str = "policy"  # what set the answer: policy, request, identity, unavailable, internal
    policy_version: str = ""
    cached: bool = False
    verdict: Verdict | None = None  # what the policy said, when it was asked and answered
    identity: Identity = NO_IDENTITY
    signals: Mapping[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    would_allow: bool | None = None  # dry run: what enforcing would have answered
    input: dict[str, Any] | None = None  # built only when the policy ran
    result: Any = None  # the raw policy value, for the audit log
    memo: dict[str, Any] | None = None  # renderings shared by decisions from the same cached allow
    valid_until: float | None = None  # when the cached verdict behind this decision stops holding
    explain_denial: bool = True  # a deny the policy made carries only its own body, as OPA-Envoy's, unless this
    challenge: Headers = ()  # a deny's own headers from the error (DPoP challenge, sign-in redirect)
    phase_clock: PhaseClock | None = None  # tracing on: when each phase of deciding ended
    explanation: Mapping[str, Any] | None = None  # explain mode: why the policy answered so (redacted)

    def _agreeing_verdict(self) -> Verdict | None:
        verdict = self.verdict
        return verdict if verdict is not None and verdict.allowed == self.allowed else None

    @property
    def upstream_headers(self) -> Headers:
        """Allow: headers set (overwriting) on the request to the upstream."""
        if not self.allowed:
            return ()
        verdict = self._agreeing_verdict()
        return self.identity.upstream_headers + (verdict.headers if verdict else ())

    @property
    def headers_to_remove(self) -> tuple[str, ...]:
        """Allow: headers removed from the request to the upstream."""
        if not self.allowed:
            return ()
        verdict = self._agreeing_verdict()
        return self.identity.headers_to_remove + (verdict.request_headers_to_remove if verdict else ())

    @property
    def response_headers(self) -> Headers:
        """Allow: headers added to the client's response. Deny: headers sent with the denial."""
        verdict = self._agreeing_verdict()
        if self.allowed:
            return self.identity.response_headers + (verdict.response_headers_to_add if verdict else ())
        if verdict is not None:
            if not self.explain_denial or verdict.body or any(n.lower() == "content-type" for n, _ in verdict.headers):
                return verdict.headers
            return verdict.headers + _JSON
        if self.challenge:
            return self.challenge if 300 <= self.http_status < 400 else _JSON + self.challenge
        if self.phase == "identity":
            return _JSON + (("www-authenticate",
                             f'Bearer error="invalid_token", error_description="{self.code}"'),)
        return _JSON

    @property
    def body(self) -> str:
        """Deny: the response body (the policy's, or a JSON error naming the code)."""
        if self.allowed or (self.challenge and 300 <= self.http_status < 400):
            return ""
        verdict = self._agreeing_verdict()
        if verdict is not None and (not self.explain_denial or verdict.body
                                    or any(n.lower() == "content-type" for n, _ in verdict.headers)):
            return verdict.body
        return json.dumps({"error": self.code, "message": self.reason, "decision_id": self.decision_id},
                          separators=(",", ":"))

    @property
    def dynamic_metadata(self) -> Mapping[str, Any] | None:
        verdict = self._agreeing_verdict()
        return verdict.dynamic_metadata if verdict is not None else None

    @property
    def query_parameters_to_set(self) -> Headers:
        verdict = self._agreeing_verdict()
        return verdict.query_parameters_to_set if self.allowed and verdict is not None else ()

    @property
    def query_parameters_to_remove(self) -> tuple[str, ...]:
        verdict = self._agreeing_verdict()
        return verdict.query_parameters_to_remove if self.allowed and verdict is not None else ()


@dataclass(frozen=True, slots=True)
class _CachedVerdict:
    verdict: Verdict
    result: Any
    memo: dict[str, Any]  # what the fronts rendered for this allow, reused on hits by the same identity
    valid_until: float
    identity: bytes = b""  # the fingerprint of the identity the memo was rendered for


def decision_ids() -> Callable[[], str]:
    """Decision ids as OPA's: UUIDs (version 4, RFC 9562 layout), unique without a syscall
    per request: 64 random bits per pipeline (the version nibble set), then the variant bits
    and a 62-bit counter."""
    prefix = (int.from_bytes(os.urandom(8), "big") & ~(0xF << 12)) | (0x4 << 12)
    counter = itertools.count((prefix << 64) | (0b10 << 62))

    def new_id() -> str:
        h = next(counter).to_bytes(16, "big").hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    return new_id


class Pipeline:
    """Wires the phases; everything it uses is passed in (see ``server.build_pipeline``)."""

    def __init__(self, policies: PolicyRuntime, *, settings: DecisionSettings | None = None,
                 identity: IdentityResolver | None = None, signals: SignalSource | None = None,
                 observers: list[Callable[[Decision, Facts | None, float], None]] | None = None,
                 tracing: DecisionTracing | None = None) -> None:
        self.policies = policies
        self.settings = settings or DecisionSettings()
        self.identity = identity
        self.signals = signals
        self.observers = observers if observers is not None else []
        self.tracing = tracing  # None: no phase clock is read (tracing off costs one test per decision)
        self.explaining: Explaining | None = None  # set by explaining.ExplainMode while a rule is live
        self.cache: DecisionCache[_CachedVerdict] = DecisionCache(self.settings.cache_max_entries)
        self.read_keys = ReadKeys()  # a repeated request's cache key, without building its input again
        self.bearer_expiry = BearerExpiry()  # how long a policy reading the token's exp may cache
        self.new_decision_id = decision_ids()
        self._cached_version = ""

    async def decide(self, facts: Facts, *, now: float) -> Decision:
        decision_id = self.new_decision_id()
        active = self.policies.active
        identity = NO_IDENTITY
        signals: Mapping[str, Any] = {}
        phases = self.tracing.start(facts) if self.tracing is not None else None
        explain: ExplainTicket | None = None
        try:
            if active is None:
                raise PolicyError("no policy loaded yet", code="policy_not_loaded")
            if self.signals is not None:
                self.signals.gate(facts, now)
            if self.identity is not None:
                try:
                    identity = await self.identity.resolve(facts, now)
                except IdentityError:
                    if self.signals is not None:
                        await self.signals.record_identity_failure(facts, now)
                    raise
                if phases is not None:
                    phases.mark("identity")
            if self.signals is not None:
                signals = await self.signals.assess(facts, identity, now)
                if phases is not None:
                    phases.mark("signals")
            if self.explaining is not None:
                explain = self.explaining.claim(identity.document, facts.path, now)
            decision = await self._decide_with_policy(active, facts, identity, signals, decision_id, now, phases,
                                                      explain)
        except AuthzError as exc:
            decision = self._error_decision(exc, decision_id, active, identity, signals)
        except Exception as exc:  # a bug must never allow
            log.error("unexpected error while deciding %s: %s", decision_id, where_it_failed(exc))
            decision = self._error_decision(
                AuthzError(f"internal error: {type(exc).__name__}", code="internal_error"),
                decision_id, active, identity, signals)
        if self.settings.dry_run and decision.phase != "request":
            decision = _as_dry_run(decision)
        if phases is not None:
            decision.phase_clock = phases
        if explain is not None:
            decision.explanation = explain.explanation
        if self.signals is not None:
            self.signals.record_outcome(facts, identity, decision, now)
        for observe in self.observers:
            observe(decision, facts, now)
        return decision

    def refuse(self, error: AuthzError, *, now: float) -> Decision:
        """A request that could not even be read: denied without asking the policy (also in
        dry-run mode, as OPA-Envoy does)."""
        decision = self._error_decision(error, self.new_decision_id(), self.policies.active, NO_IDENTITY, {})
        for observe in self.observers:
            observe(decision, None, now)
        return decision

    def replay(self, previous: Decision, facts: Facts, *, now: float) -> Decision | None:
        """The same answer again for a request that differs from ``previous``'s at most in its
        per-request values (see ``repeats``), or None when anything could have changed it: the
        cached verdict expired, the policy changed, the policy reads per-request values (request
        id, time, source port: then its answers are keyed on them), signals must see every
        request, or the identity cannot be re-checked."""
        active = self.policies.active
        if (previous.valid_until is None or previous.valid_until <= now or active is None
                or previous.policy_version != active.version or active.volatile_tree is not None
                or self.signals is not None
                or self.explaining is not None and self.explaining.wants(previous.identity.document, facts.path, now)):
            return None
        if self.identity is not None:
            still_valid = getattr(self.identity, "still_valid", None)
            if still_valid is None or not still_valid(previous.identity, now):
                return None
        self.cache.stats.hits += 1
        dry_run = self.settings.dry_run  # recorded as decide() records it (only allows are replayed)
        decision = Decision(allowed=previous.allowed, code=previous.code, reason=previous.reason,
                            http_status=previous.http_status, decision_id=self.new_decision_id(), phase=previous.phase,
                            policy_version=previous.policy_version, cached=True, verdict=previous.verdict,
                            identity=previous.identity, signals=previous.signals, dry_run=dry_run,
                            would_allow=True if dry_run else None, result=previous.result,
                            memo=previous.memo, valid_until=previous.valid_until)
        for observe in self.observers:
            observe(decision, facts, now)
        return decision

    async def _decide_with_policy(self, active: ActivePolicy, facts: Facts, identity: Identity,
                                  signals: Mapping[str, Any], decision_id: str, now: float,
                                  phases: PhaseClock | None = None, explain: ExplainTicket | None = None) -> Decision:
        if active.version != self._cached_version:
            self.cache.clear()  # a new policy or data version: nothing cached still holds
            self.read_keys.clear()
            self._cached_version = active.version
        use_cache = explain is None and active.cache.enabled and self.settings.cache_max_entries > 0
        prepared = _prepare_input(active, facts, identity, signals, use_cache, self.read_keys)
        if use_cache:
            cached = self.cache.get(prepared.key, now)
            if phases is not None:
                phases.mark("cache", cached is not None)
            if cached is not None:
                # The rendering carries identity headers: shared only with the identity it was made for.
                shared = cached.memo if cached.identity == identity.fingerprint else None
                decision = self._render(cached.verdict, cached.result, decision_id, active, identity, signals,
                                        None, cached=True, memo=shared)
                decision.valid_until = cached.valid_until
                return decision
        document, input_json = _complete_input(prepared, active, facts, identity, signals)
        key = prepared.key
        if explain is None:
            result = await active.evaluate(input_json, timeout=self.settings.policy_timeout)
        else:
            traced = await active.explain(input_json, timeout=self.settings.policy_timeout)
            result = traced.value
            explain.explain(traced, document, active.policy_set.serving_modules)
        if phases is not None:
            phases.mark("policy", explain.mode if explain is not None else None)
        recorded: dict[str, Any] | None = document
        if active.input_tree is not None:
            recorded = None  # partial: the audit log builds the full input from the facts
        if result is UNDEFINED:
            raise PolicyError("the policy decision is undefined", code="policy_undefined")
        verdict = read_result(result)
        memo: dict[str, Any] = {}
        if use_cache:
            deadline = self._deadline(active, facts, identity, now)
            self.cache.put(key, _CachedVerdict(verdict, result, memo, deadline, identity.fingerprint), deadline, now)
        return self._render(verdict, result, decision_id, active, identity, signals, recorded, cached=False,
                            memo=memo)

    def _deadline(self, active: ActivePolicy, facts: Facts, identity: Identity, now: float) -> float:
        ttl = active.cache.ttl if active.cache.ttl is not None else self.settings.cache_ttl
        if active.reads_clock:
            ttl = min(ttl, self.settings.clock_ttl)
            token_exp = self.bearer_expiry.of(facts)
            if token_exp is not None:
                ttl = min(ttl, token_exp - now)
        deadline = now + ttl
        if identity.expires_at is not None:
            deadline = min(deadline, identity.expires_at)
        return deadline

    def _render(self, verdict: Verdict, result: Any, decision_id: str, active: ActivePolicy, identity: Identity,
                signals: Mapping[str, Any], document: dict[str, Any] | None, *, cached: bool,
                memo: dict[str, Any] | None = None) -> Decision:
        if verdict.allowed:
            return Decision(allowed=True, code=verdict.reason or "allowed", reason="allowed by policy", http_status=200,
                            decision_id=decision_id, policy_version=active.version, cached=cached, verdict=verdict,
                            identity=identity, signals=signals, input=document, result=result,
                            memo=memo if not identity.response_headers else None)
        code = verdict.reason or "policy_denied"
        return Decision(allowed=False, code=code,
                        reason=f"denied by policy ({code})" if verdict.reason else "denied by policy",
                        http_status=verdict.http_status, decision_id=decision_id, policy_version=active.version,
                        cached=cached, verdict=verdict, identity=identity, signals=signals, input=document,
                        result=result, explain_denial=self.settings.explain_policy_denies)

    def _error_decision(self, error: AuthzError, decision_id: str, active: ActivePolicy | None,
                        identity: Identity, signals: Mapping[str, Any]) -> Decision:
        phase = _phase(error)
        status = self.settings.deny_status if phase in ("policy", "internal") else error.status
        return Decision(allowed=False, code=error.code, reason=error.message, http_status=status,
                        decision_id=decision_id, phase=phase,
                        policy_version=active.version if active is not None else "",
                        identity=identity, signals=signals, challenge=error.headers)


def _phase(error: AuthzError) -> str:
    for kind, phase in ((RequestError, "request"), (IdentityError, "identity"), (UnavailableError, "unavailable"),
                        (PolicyError, "policy")):
        if isinstance(error, kind):
            return phase
    return "internal"


def _as_dry_run(decision: Decision) -> Decision:
    """OPA-Envoy's dry-run: record what would have been decided, allow the request."""
    if decision.allowed:
        decision.dry_run = True
        decision.would_allow = True
        return decision
    return Decision(
        allowed=True, code=decision.code, reason=f"dry run: would deny ({decision.reason})", http_status=200,
        decision_id=decision.decision_id, phase=decision.phase, policy_version=decision.policy_version,
        cached=decision.cached, verdict=decision.verdict, identity=decision.identity, signals=decision.signals,
        dry_run=True, would_allow=False, input=decision.input, result=decision.result,
    )


@dataclass(slots=True)
class _Prepared:
    """The cache key of a request's input, and as much of the input as making it took."""

    key: bytes = b""
    document: dict[str, Any] | None = None
    input_json: bytes | None = None


def _prepare_input(active: ActivePolicy, facts: Facts, identity: Identity, signals: Mapping[str, Any],
                   use_cache: bool, read_keys: ReadKeys) -> _Prepared:
    prepared = _Prepared()
    if use_cache:
        if active.cache.key_paths:
            prepared.document = build_input(facts, identity.document, signals)
            prepared.key = narrow_key(active.key_prefix, prepared.document, active.cache.key_paths)
        elif active.input_tree is not None:
            # Keyed on what the policy reads, as the engine gets it (one encoding serves both
            # when it can), so a (user, route) pair repeats whatever else in the request varies.
            request_key = full_key(active.key_prefix, facts, identity.fingerprint, signals,
                                   volatile_tree=active.volatile_tree,
                                   signal_paths=active.signal_paths) if facts.fingerprint else b""
            known = read_keys.get(request_key) if request_key else None
            if known is not None:
                prepared.key = known
                return prepared
            document = prepared.document = build_input(facts, identity.document, signals, active.input_tree)
            if active.unnamed_volatile is None:
                prepared.input_json = encode_input(document)
                prepared.key = read_key(active.key_prefix, prepared.input_json)
            else:
                prepared.key = read_key(active.key_prefix, encode_input(
                    {**document, "attributes": without(document["attributes"], active.unnamed_volatile)}))
            if request_key:
                read_keys.put(request_key, prepared.key)
        else:
            prepared.key = full_key(active.key_prefix, facts, identity.fingerprint, signals,
                                    volatile_tree=active.volatile_tree, signal_paths=active.signal_paths)
    return prepared


def _complete_input(prepared: _Prepared, active: ActivePolicy, facts: Facts, identity: Identity,
                    signals: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The document the policy gets (projected when the policy allows) and its encoding."""
    document = prepared.document
    if document is None:
        document = build_input(facts, identity.document, signals, active.input_tree)
    elif active.input_tree is not None and prepared.input_json is None and active.cache.key_paths:
        document = project(document, active.input_tree)
    input_json = prepared.input_json if prepared.input_json is not None else encode_input(document)
    return document, input_json
