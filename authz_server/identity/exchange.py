"""OAuth 2.0 Token Exchange (RFC 8693): service A gets a narrow credential to call B for a user.

``POST /token`` (form-encoded, on its own address) with
``grant_type=urn:ietf:params:oauth:grant-type:token-exchange``, a ``subject_token`` (the
user's JWT from a trusted issuer, or the user's authz-server session id) and the target
``audience``. The actor is the caller itself, known from its mTLS client certificate (its
SPIFFE ID), never from a parameter it could forge. Rules in config say which actor may
ask for which audiences and scopes.

The answer is an RFC 9068 access token signed by authz-server (ES256): ``sub`` the user,
``aud`` the target, scopes narrowed to what the rule and the subject token both allow, a
short lifetime never beyond the subject token's, the delegation chain in ``act`` (RFC 8693
§4.1, most recent actor outermost), and ``cnf.x5t#S256`` binding it to the actor's
certificate (RFC 8705), so only the actor can use it. authz-server trusts its own exchange
issuer, so the token works at once on every sidecar.

This module is the exchange itself, on plain values (the form, the actor); the HTTP endpoint
that reads them from a request is ``exchangefront``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import AuthzError, ConfigError
from .encoding import b64url_encode
from .jose import encode_jwt
from .resolver import TokenValidator, accept_actor
from .sessions import SessionStore, session_key
from .workloads import split_spiffe_id

log = logging.getLogger("authz_server.exchange")

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
SESSION_ID_TYPE = "urn:authz-server:params:oauth:token-type:session_id"
MAX_FORM_BYTES = 32 * 1024
# Claims of the subject carried into the exchanged token for the target's policy.
CARRIED_CLAIMS = ("roles", "groups", "realm_access", "email", "preferred_username", "tenant", "acr", "amr")


@dataclass(frozen=True)
class ExchangeRule:
    actor: str  # SPIFFE ID, or spiffe://domain/* pattern
    audiences: tuple[str, ...]
    scopes: tuple[str, ...] = ()  # empty: whatever the subject token carries


@dataclass(frozen=True)
class ExchangeConfig:
    addr: str = ""
    issuer: str = "urn:authz-server:exchange"
    ttl: float = 300.0
    key_file: str = ""  # PEM EC P-256, created (0600) when missing; empty: a key per process
    rules: tuple[ExchangeRule, ...] = ()
    trust_forwarded_client_cert: bool = False  # behind a sidecar that sets x-forwarded-client-cert


class ExchangeError(AuthzError):
    """An RFC 6749 §5.2 error: ``code`` is the ``error`` value."""

    def __init__(self, code: str, description: str, *, status: int = 400) -> None:
        super().__init__(description, code=code)
        self.status = status


class ExchangeSigner:
    """authz-server's own signing key for exchanged tokens, and its public JWKS."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        public = key.public_key().public_numbers()
        self._jwk = {
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "x": b64url_encode(public.x.to_bytes(32, "big")), "y": b64url_encode(public.y.to_bytes(32, "big")),
        }
        thumb = json.dumps({k: self._jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
        self.kid = b64url_encode(hashlib.sha256(thumb.encode()).digest())  # RFC 7638 thumbprint
        self._jwk["kid"] = self.kid

    @classmethod
    def load_or_create(cls, key_file: str) -> "ExchangeSigner":
        if not key_file:
            return cls(ec.generate_private_key(ec.SECP256R1()))
        path = Path(key_file)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError):
                raise ConfigError("not an unencrypted PEM private key", key="exchange.key_file") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise ConfigError("the exchange key must be an EC P-256 key", key="exchange.key_file")
            return cls(key)
        key = ec.generate_private_key(ec.SECP256R1())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return cls(key)

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        return encode_jwt(claims, self._key, "ES256", {"typ": "at+jwt", "kid": self.kid})


class TokenExchange:
    def __init__(self, config: ExchangeConfig, *, signer: ExchangeSigner, tokens: TokenValidator | None,
                 store: SessionStore | None, delegation_actors: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.signer = signer
        self.tokens = tokens
        self.store = store
        self.clock = clock
        self._rules = [(accept_actor((rule.actor,)), rule) for rule in config.rules]
        self._delegates = accept_actor(delegation_actors)
        self.issued = 0
        self.refused = 0

    # -- the exchange itself
    async def exchange(self, form: Mapping[str, str], actor: tuple[str, str]) -> dict[str, Any]:
        actor_id, actor_thumbprint = actor
        split_spiffe_id(actor_id)
        if form.get("grant_type") != GRANT_TYPE:
            raise ExchangeError("unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
        if form.get("actor_token") or form.get("actor_token_type"):
            raise ExchangeError("invalid_request", "the actor is the mTLS client; actor_token is not accepted")
        requested_type = form.get("requested_token_type", ACCESS_TOKEN)
        if requested_type not in (ACCESS_TOKEN, JWT_TYPE):
            raise ExchangeError("invalid_request", f"requested_token_type must be {ACCESS_TOKEN} or {JWT_TYPE}")
        audience = form.get("audience") or form.get("resource")
        if not audience:
            raise ExchangeError("invalid_request", "name the target service in audience (or resource)")
        rules = [rule for accept, rule in self._rules if accept(actor_id)]
        if not rules:
            raise ExchangeError("unauthorized_client", f"{actor_id} may not exchange tokens")
        allowed = [rule for rule in rules if audience in rule.audiences]
        if not allowed:
            raise ExchangeError("invalid_target", f"{actor_id} may not obtain tokens for {audience!r}")
        subject, subject_claims, subject_exp, previous_act = await self._subject(form, actor_id)
        now = self.clock()
        scopes = _narrow_scopes(form.get("scope", ""), allowed, subject_claims)
        lifetime = self.config.ttl
        if subject_exp is not None:
            lifetime = min(lifetime, subject_exp - now)
        if lifetime <= 0:
            raise ExchangeError("invalid_grant", "the subject token has expired")
        act: dict[str, Any] = {"sub": actor_id}
        if previous_act:
            act["act"] = previous_act
        claims: dict[str, Any] = {
            "iss": self.config.issuer, "sub": subject, "aud": audience, "iat": int(now), "nbf": int(now),
            "exp": int(now + lifetime), "jti": b64url_encode(os.urandom(16)), "client_id": actor_id, "act": act,
            "cnf": {"x5t#S256": actor_thumbprint},
            **{k: subject_claims[k] for k in CARRIED_CLAIMS if k in subject_claims},
        }
        if scopes:
            claims["scope"] = " ".join(scopes)
        token = self.signer.sign(claims)
        log.info("token exchange: %s obtained a token for %s on behalf of %s (scope %r)", actor_id, audience,
                 subject, claims.get("scope", ""))
        answer: dict[str, Any] = {"access_token": token, "issued_token_type": ACCESS_TOKEN, "token_type": "Bearer",
                                  "expires_in": int(lifetime)}
        if scopes:
            answer["scope"] = " ".join(scopes)
        return answer

    async def _subject(self, form: Mapping[str, str], actor_id: str
                       ) -> tuple[str, Mapping[str, Any], float | None, Any]:
        token = form.get("subject_token")
        token_type = form.get("subject_token_type")
        if not token or not token_type:
            raise ExchangeError("invalid_request", "subject_token and subject_token_type are required")
        now = self.clock()
        if token_type == SESSION_ID_TYPE:
            if self.store is None:
                raise ExchangeError("invalid_request", "sessions are disabled")
            try:
                session = await self.store.lookup(session_key(token), now=now)
            except AuthzError as exc:
                raise ExchangeError("invalid_grant", f"subject session: {exc.code}") from None
            if session.binding.spiffe_id != actor_id and not self._delegates(actor_id):
                raise ExchangeError("invalid_grant", f"the session is not {actor_id}'s to exchange")
            previous = _chain_to_act(session.delegation)
            return session.subject, session.claims, session.expires, previous
        if token_type in (ACCESS_TOKEN, JWT_TYPE):
            if self.tokens is None:
                raise ExchangeError("invalid_request", "no trusted issuers are configured")
            try:
                verified = await self.tokens.validate(token, now=now, client_cert_sha256=None)
            except AuthzError as exc:
                raise ExchangeError("invalid_grant", f"subject token: {exc.code}: {exc.message}") from None
            if getattr(verified, "cnf_jkt", None):
                raise ExchangeError("invalid_grant", "a DPoP-bound subject token cannot be exchanged: its key "
                                                     "stays with the client that holds it")
            claims = verified.claims
            return verified.subject, claims, verified.expires_at, claims.get("act")
        raise ExchangeError("invalid_request", "unsupported subject_token_type")


def _narrow_scopes(requested: str, rules: list[ExchangeRule], subject_claims: Mapping[str, Any]) -> list[str]:
    held = subject_claims.get("scope") or subject_claims.get("scp")
    held_set = set(held.split() if isinstance(held, str) else held or [])
    permitted: set[str] = set()
    unrestricted = False
    for rule in rules:
        if rule.scopes:
            permitted.update(rule.scopes)
        else:
            unrestricted = True
    asked = requested.split()
    if asked:
        too_wide = [s for s in asked if (not unrestricted and s not in permitted) or (held_set and s not in held_set)]
        if too_wide:
            raise ExchangeError("invalid_scope", f"not grantable: {' '.join(too_wide)}")
        return asked
    candidates = held_set if unrestricted or not permitted else (permitted & held_set if held_set else permitted)
    return sorted(candidates)


def _chain_to_act(delegation: tuple[Mapping[str, str], ...]) -> Any:
    act: Any = None
    for hop in delegation:
        act = {"sub": hop["actor"], **({"act": act} if act else {})}
    return act
