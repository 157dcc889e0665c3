"""Who is calling: the workload (mTLS), the user (session, or a JWT validated once), and
who acts for whom. The result is ``input.identity`` for policies plus the headers that go
with it.

Order of evidence for the user:
0. the session cookie counts only on browser routes, and a bearer token outranks it: with a
   token, the cookie is not even looked up (a stale cookie must not lock the user out, and a
   cookie planted by someone else must not replace the user's own token: session fixation).
   The token is validated and starts a fresh session, whose cookie replaces the old one.
1. a session id (``x-session-id``, or the cookie as above): a store lookup, no crypto. Presented by the client it is bound to, it is
   the user's own call. Presented by another workload that is allowed to act for users
   (``sessions.delegation.actors``), it is delegation: the policy sees
   ``input.identity.delegation`` and decides. Presented by anyone else it is a stolen
   session: denied (``session_bound_elsewhere``) and logged with both identities.
2. an access token from a trusted issuer: a JWT validated (signature, claims, RFC 8705
   binding) or an opaque token introspected (RFC 7662), checked for replay by another client,
   and exchanged for a new session whose id is returned to the client (``x-session-id``,
   plus a ``__Host-`` cookie on browser routes).

DPoP (RFC 9449): a token bound to a key (``cnf.jkt``) counts only as ``Authorization: DPoP``
with a valid proof of that key; the session made from it stays bound to the key, and every
call with that session proves possession again (one signature check, no token). Proof
``jti``s are claimed in the session store, shared by every replica: a proof is used once.
Without issuers configured, a bearer token is left alone for the policy to read (the
OPA-Envoy tutorial's way).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from ..decisioncache import identity_fingerprint, token_fingerprint
from ..errors import AuthzError, ReplayError, SessionError, TokenError
from ..facts import Facts
from .credentials import (SESSION_COOKIE, SESSION_HEADER, access_token, dpop_proof, is_browser_route,
                          request_uri, session_cookie, session_header, user_agent)
from .browser import BrowserLogin
from .dpop import DpopSettings, ProofChecker, dpop_error
from .sessions import (Binding, MemoryStore, Session, SessionStore, describe_token, mint_session, replay_error,
                       session_key, sha256_hex)
from .verified import SPIFFE_ID_HEADER, SUBJECT_HEADER, Identity
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
    browser: BrowserLogin | None = None  # browser_login: sign-in on browser routes
    stats: IdentityStats = field(default_factory=IdentityStats)

    def __post_init__(self) -> None:
        self._accept_actor = accept_actor(self.settings.delegation_actors)
        # DPoP proof ids are claimed where sessions live (shared by replicas), else in process.
        self._proof_ids: SessionStore = self.store if self.store is not None else MemoryStore()
        self._session_proofs = ProofChecker(DpopSettings(mode="allowed"))
        # Identities without a user depend on the workload alone: built once per workload.
        self._plain: dict[WorkloadIdentity | None, Identity] = {}
        # A session's identity changes only when the session is touched (its idle deadline
        # moves) or is presented by another workload: built once per such combination.
        self._by_session: dict[tuple[str, float, WorkloadIdentity | None, Binding, bool], Identity] = {}
        self._keys: dict[str, str] = {}  # presented id -> its store key (sha256), bounded

    async def resolve(self, facts: Facts, now: float) -> Identity:
        workload = self.workloads.verify(facts, now) if self.workloads is not None else None
        browser = self.browser if self.browser is not None and is_browser_route(facts) else None
        if browser is not None:
            await self._browser_paths(browser, facts, workload, now)
        presented_token = access_token(facts) if self.tokens is not None else None
        token = presented_token[1] if presented_token is not None else None
        presented = None
        from_cookie = False
        if self.store is not None:
            presented = session_header(facts)
            if presented is None and token is None:
                presented = session_cookie(facts, self.settings.cookie)
                from_cookie = presented is not None
        if browser is not None and presented is None and token is None:
            raise await self._sign_in_first(browser, facts, now)
        if presented is None and token is None:  # the common case of a plain workload call
            plain = self._plain.get(workload)
            if plain is None or (plain.expires_at is not None and plain.expires_at <= now):
                plain = self._identity("mtls" if workload else "none", workload, None, (), facts, now)
                if len(self._plain) > 10_000:
                    self._plain.clear()
                self._plain[workload] = plain
            return plain
        client = self._binding(workload, facts)
        if presented is not None and self.store is not None:
            self.stats.session_lookups += 1
            key = self._keys.get(presented)
            if key is None:
                key = session_key(presented)  # validates the id's shape too
                if len(self._keys) >= 100_000:
                    self._keys.clear()
                self._keys[presented] = key
            try:
                session = await self.store.lookup(key, now=now)
            except SessionError:
                if browser is not None and from_cookie:  # expired or revoked: sign in again
                    raise await self._sign_in_first(browser, facts, now) from None
                raise
            if session.jkt:
                await self._prove(facts, session.jkt, self._checker(session.issuer), now)
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
        assert presented_token is not None and self.tokens is not None
        return await self._from_token(presented_token, workload, client, facts, now)

    def still_valid(self, identity: Identity, now: float) -> bool:
        """For a byte-identical repeat request: is the identity behind a cached decision
        still good, judged from in-process state only?"""
        if identity.expires_at is not None and identity.expires_at <= now:
            return False
        if identity.document and ((identity.document.get("user") or {}).get("cnf") or {}).get("jkt"):
            return False  # DPoP-bound: every request proves possession again, with a fresh proof
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

    # -- browser sign-in
    async def _browser_paths(self, browser: BrowserLogin, facts: Facts, workload: WorkloadIdentity | None,
                             now: float) -> None:
        """The callback and logout paths are answered here, with a redirect (or a refusal)."""
        kind = browser.route(facts)
        if kind == "callback":
            if self.store is None:
                raise SessionError("browser sign-in needs sessions", code="sessions_disabled")

            async def open_session(subject: str, claims: Mapping[str, Any]) -> tuple[str, float]:
                new_id, session = await self._mint_session(
                    subject, browser.config.issuer, claims, self._binding(workload, facts), now,
                    expires=now + self.settings.max_lifetime)
                return new_id, session.expires

            raise await browser.finish(facts, now, open_session)
        if kind == "logout":
            presented = session_cookie(facts, self.settings.cookie)
            if presented is not None and self.store is not None:
                with contextlib.suppress(SessionError):
                    await self.store.revoke(session_key(presented), now=now)
            raise await browser.logout(facts, now)

    async def _sign_in_first(self, browser: BrowserLogin, facts: Facts, now: float) -> AuthzError:
        if browser.wants_redirect(facts):
            return await browser.start(facts, now)
        return SessionError("sign in first (this route signs browsers in)", code="session_required")

    def _binding(self, workload: WorkloadIdentity | None, facts: Facts) -> Binding:
        return Binding(
            spiffe_id=workload.spiffe_id if workload else "",
            cert_sha256=workload.cert_sha256 if workload else "",
            user_agent_sha256=sha256_hex(user_agent(facts)) if self.settings.bind_user_agent else "",
        )

    async def _mint_session(self, subject: str, issuer: str, claims: Mapping[str, Any], client: Binding, now: float,
                            *, expires: float, jti: str = "", delegation: tuple[Mapping[str, str], ...] = (),
                            jkt: str = "") -> tuple[str, Session]:
        """A session for a verified token or sign-in, minted by ``sessions.mint_session``."""
        assert self.store is not None
        minted = await mint_session(
            self.store, subject=subject, issuer=issuer,
            claims={k: v for k, v in claims.items() if k in self.settings.claims}, binding=client, now=now,
            expires=expires, idle_timeout=self.settings.idle_timeout, jti=jti, delegation=delegation, jkt=jkt)
        self.stats.sessions_created += 1
        return minted

    # -- DPoP
    def _checker(self, issuer: str) -> ProofChecker:
        by_issuer = getattr(self.tokens, "proof_checker", None)
        checker = by_issuer(issuer) if by_issuer is not None else None
        return checker if checker is not None else self._session_proofs

    async def _prove(self, facts: Facts, jkt: str, checker: ProofChecker, now: float,
                     token: str | None = None) -> None:
        proof = checker.check(dpop_proof(facts), method=facts.method, url=request_uri(facts), now=now,
                              access_token=token, bound_jkt=jkt)
        first = await self._proof_ids.claim_jti(f"dpop:{proof.jkt}", proof.jti, "proof", until=proof.remember_until,
                                                now=now)
        if first is not None:
            self.stats.replays += 1
            log.warning("DPoP proof replay refused (key %s)", proof.jkt[:12])
            raise dpop_error("dpop_replay", "this DPoP proof was already used", checker.settings)

    async def _from_token(self, presented: tuple[str, str], workload: WorkloadIdentity | None, client: Binding,
                          facts: Facts, now: float) -> Identity:
        assert self.tokens is not None
        scheme, token = presented
        verified = await self.tokens.validate(token, now=now,
                                              client_cert_sha256=workload.x5t_s256 if workload else None)
        self.stats.tokens_validated += 1
        jkt = getattr(verified, "cnf_jkt", None) or ""
        if jkt or scheme == "dpop":
            checker = self._checker(verified.issuer)
            if not jkt:
                # RFC 9449 §7.1: under the DPoP scheme the token must be bound to the proof's key.
                raise dpop_error("dpop_key_mismatch", "the token is not DPoP-bound", checker.settings)
            if scheme != "dpop":
                # RFC 9449 §7.2: a DPoP-bound token presented as a bearer token is refused.
                raise dpop_error("dpop_required", "a DPoP-bound token must be sent as 'Authorization: DPoP'",
                                 checker.settings)
            await self._prove(facts, jkt, checker, now, token)
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
                                  claims=claims, credential_fingerprint=token_fingerprint(token))
        expires = now + self.settings.max_lifetime
        if expires_at and not self.settings.outlive_token:
            expires = min(expires, expires_at)
        new_id, session = await self._mint_session(
            verified.subject, verified.issuer, claims, client, now, expires=expires, jti=jti,
            delegation=_act_chain(verified.claims.get("act"), verified.subject), jkt=jkt)
        return self._identity("jwt", workload, session, session.delegation, facts, now, removes_token=True,
                              new_session_id=new_id)

    # -- the result
    def _identity(self, method: str, workload: WorkloadIdentity | None, session: Session | None,
                  delegation: tuple[Mapping[str, str], ...], facts: Facts, now: float, *,
                  removes_token: bool = False, token: Any = None, claims: Mapping[str, Any] | None = None,
                  credential_fingerprint: bytes = b"", new_session_id: str = "") -> Identity:
        user: dict[str, Any] | None = None
        if session is not None:
            user = {"sub": session.subject, "iss": session.issuer, "claims": dict(session.claims),
                    "cnf": {"jkt": session.jkt} if session.jkt else session.claims.get("cnf")}
        elif token is not None:
            user = {"sub": token.subject, "iss": token.issuer, "claims": dict(claims or {}),
                    "cnf": token.claims.get("cnf")}
        document = {
            "method": method,
            "workload": workload.to_input() if workload else None,
            "user": user,
            "session": session.to_input() if session else None,
            "delegation": [dict(d) for d in delegation],
        }
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
            upstream += ((SUBJECT_HEADER, subject),)
        if workload is not None:
            upstream += ((SPIFFE_ID_HEADER, workload.spiffe_id),)
        response: tuple[tuple[str, str], ...] = ()
        if new_session_id:
            upstream += ((SESSION_HEADER, new_session_id),)  # so the service can forward it on the user's behalf
            response += ((SESSION_HEADER, new_session_id),)
            if is_browser_route(facts) and session is not None:
                max_age = int(session.expires - now)
                response += (("set-cookie", f"{self.settings.cookie}={new_session_id}; Path=/; Secure; HttpOnly; "
                                            f"SameSite=Lax; Max-Age={max_age}"),)
        return Identity(
            document=document,
            fingerprint=identity_fingerprint(method, workload.fingerprint if workload else b"",
                                             session.fingerprint if session else credential_fingerprint, delegation),
            expires_at=min(expires) if expires else None,
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
