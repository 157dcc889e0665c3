"""Who is calling: the workload (mTLS), the user (session, or a JWT validated once), and
who acts for whom. The result is ``input.identity`` for policies plus the headers that go
with it.

Order of evidence for the user:
1. a session id: a store lookup, no crypto. Presented by the client it is bound to, it is
   the user's own call. Presented by another workload that is allowed to act for users
   (``sessions.delegation.actors``), it is delegation: the policy sees
   ``input.identity.delegation`` and decides. Presented by anyone else it is a stolen
   session: denied (``session_bound_elsewhere``) and logged with both identities.
2. a bearer JWT from a trusted issuer: validated (signature, claims, RFC 8705 binding),
   checked for replay by another client, and exchanged for a new session whose id is
   returned to the client (``x-session-id``, plus a ``__Host-`` cookie on browser routes).
Without issuers configured, a bearer token is left alone for the policy to read (the
OPA-Envoy tutorial's way).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from ..decision import Identity
from ..errors import ReplayError, SessionError, TokenError
from ..facts import Facts
from .credentials import SESSION_COOKIE, SESSION_HEADER, bearer_token, session_id, user_agent
from .sessions import (Binding, Session, SessionStore, describe_token, new_session_id, replay_error, session_key,
                       sha256_hex)
from .workloads import WorkloadIdentity, WorkloadVerifier

log = logging.getLogger("authz_server.identity")

# Claims copied into the session for policies (and kept out of it: none of the token itself).
DEFAULT_SESSION_CLAIMS = ("sub", "iss", "aud", "scope", "scp", "roles", "groups", "realm_access", "client_id", "azp",
                          "email", "name", "preferred_username", "tenant", "acr", "amr", "auth_time", "act", "cnf",
                          "jti")


# A token without ``jti`` cannot be told apart from its replays by its id. ``digest`` (the
# default) tracks it by a digest of its signed part instead, so the first client to use it
# owns it until it expires, as with a ``jti``; ``refuse`` turns such tokens away.
TOKENS_WITHOUT_JTI = ("digest", "refuse")


class VerifiedTokenLike(Protocol):
    issuer: str
    subject: str
    claims: Mapping[str, Any]
    jti: str | None
    expires_at: float | None


class TokenValidator(Protocol):
    async def validate(self, token: str, *, now: float, client_cert_sha256: str | None = None) -> Any: ...


@dataclass(frozen=True)
class SessionSettings:
    enabled: bool = True
    idle_timeout: float = 15 * 60
    max_lifetime: float = 8 * 3600
    bind_user_agent: bool = False
    outlive_token: bool = False  # False: a session never outlives the token it was made from
    cookie: str = SESSION_COOKIE
    delegation_actors: tuple[str, ...] = ()  # SPIFFE IDs, or spiffe://domain/* patterns
    max_delegation_hops: int = 2
    claims: tuple[str, ...] = DEFAULT_SESSION_CLAIMS
    one_time_use_issuers: tuple[str, ...] = ()
    tokens_without_jti: str = "digest"  # see TOKENS_WITHOUT_JTI


def accept_actor(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    exact = {p for p in patterns if not p.endswith("/*")}
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("/*"))
    return lambda spiffe_id: spiffe_id in exact or (bool(prefixes) and spiffe_id.startswith(prefixes))


@dataclass
class IdentityStats:
    sessions_created: int = 0
    session_lookups: int = 0
    tokens_validated: int = 0
    replays: int = 0
    stolen_sessions: int = 0
    delegations: int = 0


@dataclass
class IdentityService:
    """Implements the pipeline's ``IdentityResolver``."""

    settings: SessionSettings
    store: SessionStore | None = None
    tokens: TokenValidator | None = None
    workloads: WorkloadVerifier | None = None
    stats: IdentityStats = field(default_factory=IdentityStats)

    def __post_init__(self) -> None:
        self._accept_actor = accept_actor(self.settings.delegation_actors)
        # Identities without a user depend on the workload alone: built once per workload.
        self._plain: dict[WorkloadIdentity | None, Identity] = {}
        # A session's identity changes only when the session is touched (its idle deadline
        # moves) or is presented by another workload: built once per such combination.
        self._by_session: dict[tuple[str, float, WorkloadIdentity | None, Binding, bool], Identity] = {}
        self._keys: dict[str, str] = {}  # presented id -> its store key (sha256), bounded

    async def resolve(self, facts: Facts, now: float) -> Identity:
        workload = self.workloads.verify(facts, now) if self.workloads is not None else None
        token = bearer_token(facts) if self.tokens is not None else None
        presented = session_id(facts, self.settings.cookie) if self.store is not None else None
        if presented is None and token is None:  # the common case of a plain workload call
            plain = self._plain.get(workload)
            if plain is None or (plain.expires_at is not None and plain.expires_at <= now):
                plain = self._identity("mtls" if workload else "none", workload, None, (), facts, now)
                if len(self._plain) > 10_000:
                    self._plain.clear()
                self._plain[workload] = plain
            return plain
        client = Binding(
            spiffe_id=workload.spiffe_id if workload else "",
            cert_sha256=workload.cert_sha256 if workload else "",
            user_agent_sha256=sha256_hex(user_agent(facts)) if self.settings.bind_user_agent else "",
        )
        if presented is not None and self.store is not None:
            self.stats.session_lookups += 1
            key = self._keys.get(presented)
            if key is None:
                key = session_key(presented)  # validates the id's shape too
                if len(self._keys) >= 100_000:
                    self._keys.clear()
                self._keys[presented] = key
            session = await self.store.lookup(key, now=now)
            cache_key = (session.key, session.last_seen, workload, client, token is not None)
            cached = self._by_session.get(cache_key)
            if cached is not None and (cached.expires_at is None or cached.expires_at > now):
                return cached
            delegation = self._delegation(session, client, workload, facts)
            built = self._identity("session", workload, session, delegation, facts, now,
                                   removes_token=token is not None)
            if len(self._by_session) >= 100_000:
                self._by_session.clear()
            self._by_session[cache_key] = built
            return built
        assert token is not None and self.tokens is not None
        return await self._from_token(token, workload, client, facts, now)

    def still_valid(self, identity: Identity, now: float) -> bool:
        """For a byte-identical repeat request: is the identity behind a cached decision
        still good, judged from in-process state only?"""
        if identity.expires_at is not None and identity.expires_at <= now:
            return False
        key = identity.document.get("session", {}) if identity.document else {}
        if not key:
            return identity.document.get("method") in ("none", "mtls")
        return self.store is not None and self.store.lookup_cached(key["id_sha256"], now=now) is not None

    # -- sessions
    def _delegation(self, session: Session, client: Binding, workload: WorkloadIdentity | None,
                    facts: Facts) -> tuple[Mapping[str, str], ...]:
        if session.binding.matches(client):
            return session.delegation
        if workload is not None and self._accept_actor(workload.spiffe_id):
            chain = (*session.delegation, {"actor": workload.spiffe_id, "on_behalf_of": session.subject})
            if len(chain) > self.settings.max_delegation_hops:
                raise SessionError(f"delegation chain of {len(chain)} hops is over the limit of "
                                   f"{self.settings.max_delegation_hops}", code="delegation_too_deep")
            self.stats.delegations += 1
            return chain
        self.stats.stolen_sessions += 1
        message = (f"session of {session.subject} bound to {session.binding.describe()} presented by "
                   f"{client.describe()} from {facts.source_address or 'unknown address'}")
        log.warning("stolen session refused: %s", message)
        raise SessionError(message, code="session_bound_elsewhere")

    async def _from_token(self, token: str, workload: WorkloadIdentity | None, client: Binding, facts: Facts,
                          now: float) -> Identity:
        assert self.tokens is not None
        verified = await self.tokens.validate(token, now=now,
                                              client_cert_sha256=workload.x5t_s256 if workload else None)
        self.stats.tokens_validated += 1
        replay_client = client.spiffe_id or client.cert_sha256 or (
            f"address={facts.source_address or '?'} ua={sha256_hex(user_agent(facts))[:16]}")
        jti = getattr(verified, "jti", None) or ""
        expires_at = getattr(verified, "expires_at", None)
        if not jti and self.settings.tokens_without_jti == "refuse":
            raise TokenError("the token has no 'jti' claim (sessions.tokens_without_jti: refuse)",
                             code="missing_claim")
        if self.store is not None:
            until = expires_at if expires_at else now + self.settings.max_lifetime
            # An issuer identifier has no fragment (RFC 8414 §2), so "#digest" keeps these
            # apart from every real (issuer, jti) pair.
            issuer_key, claimed = (verified.issuer, jti) if jti else (f"{verified.issuer}#digest", token_digest(token))
            first = await self.store.claim_jti(issuer_key, claimed, replay_client, until=until, now=now)
            if first is not None and (first != replay_client or verified.issuer in self.settings.one_time_use_issuers):
                self.stats.replays += 1
                error = (replay_error(verified.issuer, jti, first, replay_client) if first != replay_client else
                         ReplayError(f"one-time {describe_token(verified.issuer, jti)} was already used",
                                     code="token_reused"))
                log.warning("token replay refused: %s", error.message)
                raise error
        claims = {k: v for k, v in verified.claims.items() if k in self.settings.claims}
        if self.store is None or not self.settings.enabled:
            return self._identity("jwt", workload, None, (), facts, now, removes_token=True, token=verified,
                                  claims=claims, token_fingerprint=hashlib.blake2b(token.encode(), digest_size=16).digest())
        expires = now + self.settings.max_lifetime
        if expires_at and not self.settings.outlive_token:
            expires = min(expires, expires_at)
        new_id = new_session_id()
        act = verified.claims.get("act")
        session = Session(
            key=session_key(new_id), subject=verified.subject, issuer=verified.issuer, claims=claims,
            created=now, expires=expires, idle_timeout=self.settings.idle_timeout, binding=client,
            generation=0, jti=jti, last_seen=now, delegation=_act_chain(act, verified.subject),
        )
        session = await self.store.create(session, now=now)
        self.stats.sessions_created += 1
        return self._identity("jwt", workload, session, session.delegation, facts, now, removes_token=True,
                              new_session_id=new_id)

    # -- the result
    def _identity(self, method: str, workload: WorkloadIdentity | None, session: Session | None,
                  delegation: tuple[Mapping[str, str], ...], facts: Facts, now: float, *,
                  removes_token: bool = False, token: Any = None, claims: Mapping[str, Any] | None = None,
                  token_fingerprint: bytes = b"", new_session_id: str = "") -> Identity:
        user: dict[str, Any] | None = None
        if session is not None:
            user = {"sub": session.subject, "iss": session.issuer, "claims": dict(session.claims)}
        elif token is not None:
            user = {"sub": token.subject, "iss": token.issuer, "claims": dict(claims or {})}
        document = {
            "method": method,
            "workload": workload.to_input() if workload else None,
            "user": user,
            "session": session.to_input() if session else None,
            "delegation": [dict(d) for d in delegation],
        }
        digest = hashlib.blake2b(method.encode(), digest_size=16)
        digest.update(workload.fingerprint if workload else b"-")
        digest.update(session.fingerprint if session else token_fingerprint or b"-")
        for hop in delegation:
            digest.update(f"{hop.get('actor', '')}>{hop.get('on_behalf_of', '')};".encode())
        expires: list[float] = []
        if session is not None:
            expires.append(session.ends_at())
        if token is not None and getattr(token, "expires_at", None):
            expires.append(float(token.expires_at))
        if workload is not None and workload.not_after:
            expires.append(workload.not_after)
        subject = user["sub"] if user else (workload.spiffe_id if workload else "")
        upstream: tuple[tuple[str, str], ...] = ()
        if subject:
            upstream += (("x-authz-subject", subject),)
        if workload is not None:
            upstream += (("x-authz-spiffe-id", workload.spiffe_id),)
        response: tuple[tuple[str, str], ...] = ()
        if new_session_id:
            upstream += ((SESSION_HEADER, new_session_id),)  # so the service can forward it on the user's behalf
            response += ((SESSION_HEADER, new_session_id),)
            if facts.context_extensions.get("browser") == "true" and session is not None:
                max_age = int(session.expires - now)
                response += (("set-cookie", f"{self.settings.cookie}={new_session_id}; Path=/; Secure; HttpOnly; "
                                            f"SameSite=Lax; Max-Age={max_age}"),)
        return Identity(
            document=document, fingerprint=digest.digest(), expires_at=min(expires) if expires else None,
            upstream_headers=upstream, response_headers=response,
            headers_to_remove=("authorization",) if removes_token else (),
        )


def token_digest(token: str) -> str:
    """What identifies a token without ``jti``: SHA-256 of its signed part. For a JWS that is
    the header and payload, not the signature: an ECDSA signature has a second valid form
    ((r, n - s)), and a replay with it must count as the same token."""
    parts = token.split(".")
    signed = f"{parts[0]}.{parts[1]}" if len(parts) == 3 else token
    return hashlib.sha256(signed.encode("utf-8", "surrogateescape")).hexdigest()


def _act_chain(act: Any, subject: str) -> tuple[Mapping[str, str], ...]:
    """RFC 8693 ``act`` (nested, most recent actor outermost) as hops, oldest first."""
    hops: list[dict[str, str]] = []
    current = act
    while isinstance(current, Mapping) and isinstance(current.get("sub"), str):
        hops.append({"actor": current["sub"], "on_behalf_of": subject})
        current = current.get("act")
    return tuple(reversed(hops))
