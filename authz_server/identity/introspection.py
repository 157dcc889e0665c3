"""Opaque access tokens, checked by asking their issuer (OAuth 2.0 Token Introspection, RFC 7662).

Per issuer (``issuers[].introspection``)::

    introspection:
      endpoint: https://idp.example.org/token/introspection   # default: the discovery metadata's
      client_id: authz-server                                  # how authz-server authenticates
      client_secret_file: secrets/introspection                #   (client_secret_basic by default)
      auth_method: client_secret_basic                         # or client_secret_post
      cache_ttl: 60s                                           # ceiling on how long an answer is kept
      timeout: 5s
      jwt_response: auto                                       # RFC 9701: auto | always | never

Answers are cached by the token's SHA-256 (never the token itself), for at most ``cache_ttl``
and never past the token's ``exp``; an inactive answer is cached as well. When the provider
cannot be reached and nothing is cached, the request is refused (``introspection_unavailable``,
503): fail closed. An active answer is held to the same rules as a JWT of that issuer: ``iss``
(when present) exactly the issuer, ``aud`` one of the accepted audiences, ``exp`` in the
future, the sender constraint (``cnf``) checked as for JWTs.

With ``jwt_response`` (RFC 9701) the answer is a JWT signed by the provider
(``application/token-introspection+jwt``), verified with the issuer's own keys before any of
it is believed; ``auto`` asks for it when the metadata lists
``introspection_signing_alg_values_supported``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import quote

import httpx

from ..errors import ConfigError, TokenError, UnavailableError
from .configread import path, seconds_between, section, url
from .encoding import json_object
from .jose import JwkSet
from .tokens import IssuerPolicy, VerifiedToken, check_claims, check_confirmation, verify_jws

log = logging.getLogger("authz_server.identity.introspection")

_KEYS = {"endpoint", "client_id", "client_secret_file", "auth_method", "cache_ttl", "timeout", "jwt_response"}
JWT_RESPONSE_TYPE = "application/token-introspection+jwt"
MAX_RESPONSE_BYTES = 64 * 1024
MAX_CACHED = 100_000


@dataclass(frozen=True, slots=True)
class IntrospectionConfig:
    client_id: str
    client_secret_file: str
    endpoint: str | None = None
    auth_method: str = "client_secret_basic"
    cache_ttl: float = 60.0
    timeout: float = 5.0
    jwt_response: str = "auto"

    @classmethod
    def from_mapping(cls, data: Any, key: str, *, base_dir: str | None = None) -> "IntrospectionConfig":
        data = section(data, key, _KEYS, ("client_id", "client_secret_file"), "client_id and client_secret_file")
        values: dict[str, Any] = {"client_id": data["client_id"],
                                  "client_secret_file": path(data["client_secret_file"], f"{key}.client_secret_file",
                                                             base_dir)}
        if "endpoint" in data:
            values["endpoint"] = url(data["endpoint"], f"{key}.endpoint", what="endpoint")
        if "auth_method" in data:
            if data["auth_method"] not in ("client_secret_basic", "client_secret_post"):
                raise ConfigError("expected client_secret_basic or client_secret_post", key=f"{key}.auth_method")
            values["auth_method"] = data["auth_method"]
        for name in ("cache_ttl", "timeout"):
            if name in data:
                values[name] = seconds_between(data[name], f"{key}.{name}", 1, 3600, "1s and 1h")
        if "jwt_response" in data:
            if data["jwt_response"] not in ("auto", "always", "never"):
                raise ConfigError("expected auto, always or never", key=f"{key}.jwt_response")
            values["jwt_response"] = data["jwt_response"]
        return cls(**values)


def read_secret(file: str, key: str) -> str:
    try:
        secret = open(file, encoding="utf-8").read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}", key=key) from None
    if not secret:
        raise ConfigError(f"{file} is empty", key=key)
    return secret


def client_auth(auth_method: str, client_id: str, secret: str) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and form fields authenticating a client (RFC 6749 §2.3.1: form-encode both, then Basic)."""
    if auth_method == "client_secret_post":
        return {}, {"client_id": client_id, "client_secret": secret}
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return {"authorization": "Basic " + base64.b64encode(pair).decode("ascii")}, {}


@dataclass(frozen=True, slots=True)
class _Answer:
    token: VerifiedToken | None  # None: inactive
    until: float


class TokenIntrospector:
    """One issuer's introspection endpoint, with the cache and the rules above."""

    def __init__(self, issuer: str, config: IntrospectionConfig, policy: IssuerPolicy, *,
                 metadata: Callable[[], Awaitable[Mapping[str, Any]]],
                 keys: Callable[[float], Awaitable[JwkSet]], client: httpx.AsyncClient) -> None:
        self.issuer = issuer
        self.config = config
        self.policy = policy
        self._metadata = metadata
        self._keys = keys
        self._client = client
        self._secret = read_secret(config.client_secret_file, "introspection.client_secret_file")
        self._cache: dict[bytes, _Answer] = {}
        self.requests = 0
        self.hits = 0

    async def introspect(self, token: str, *, now: float, client_cert_sha256: str | bytes | None = None
                         ) -> VerifiedToken:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        cached = self._cache.get(digest)
        if cached is not None and now < cached.until:
            self.hits += 1
            answer = cached
        else:
            answer = await self._ask(token, now, client_cert_sha256)
            if len(self._cache) >= MAX_CACHED:
                self._cache = {k: v for k, v in self._cache.items() if now < v.until}
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
            self._cache[digest] = answer
        if answer.token is None:
            raise TokenError(f"{self.issuer} says the token is not active", code="token_inactive")
        if answer.token.expires_at is not None and now >= answer.token.expires_at + self.policy.leeway:
            raise TokenError("token expired", code="expired_token")
        # A cached answer is re-checked against this call's certificate (cnf x5t#S256).
        check_confirmation(dict(answer.token.claims), self.policy, client_cert_sha256)
        return answer.token

    async def _ask(self, token: str, now: float, client_cert_sha256: str | bytes | None) -> _Answer:
        try:
            metadata = await self._metadata() if self.config.endpoint is None or \
                self.config.jwt_response == "auto" else {}
        except Exception as exc:  # discovery down: nothing to ask
            raise UnavailableError(f"introspection for {self.issuer}: no provider metadata ({exc})",
                                   code="introspection_unavailable") from None
        endpoint = self.config.endpoint or metadata.get("introspection_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise UnavailableError(f"{self.issuer} publishes no introspection_endpoint",
                                   code="introspection_unavailable")
        want_jwt = self.config.jwt_response == "always" or (
            self.config.jwt_response == "auto" and bool(metadata.get("introspection_signing_alg_values_supported")))
        headers, form = client_auth(self.config.auth_method, self.config.client_id, self._secret)
        headers["accept"] = JWT_RESPONSE_TYPE if want_jwt else "application/json"
        form = {"token": token, **form}
        self.requests += 1
        try:
            response = await self._client.post(endpoint, data=form, headers=headers, timeout=self.config.timeout)
        except httpx.HTTPError as exc:
            log.warning("introspection at %s failed: %s", endpoint, type(exc).__name__)
            raise UnavailableError(f"introspection endpoint of {self.issuer} unreachable ({type(exc).__name__})",
                                   code="introspection_unavailable") from None
        if response.status_code != 200 or len(response.content) > MAX_RESPONSE_BYTES:
            raise UnavailableError(f"introspection endpoint of {self.issuer} answered HTTP {response.status_code}",
                                   code="introspection_unavailable")
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if want_jwt and content_type == JWT_RESPONSE_TYPE:
            document = await self._from_jwt(response.text, now)
        elif want_jwt and self.config.jwt_response == "always":
            raise UnavailableError(f"{self.issuer} did not answer with a signed introspection response",
                                   code="introspection_unavailable")
        else:
            try:
                document = json_object(response.content)
            except ValueError as exc:
                raise UnavailableError(f"introspection answer is not a JSON object: {exc}",
                                       code="introspection_unavailable") from None
        return self._answer(document, now, client_cert_sha256)

    async def _from_jwt(self, text: str, now: float) -> Mapping[str, Any]:
        """RFC 9701 §5: a JWT from the provider, for us (``aud`` our client id), holding the
        answer in ``token_introspection``."""
        policy = IssuerPolicy(self.issuer, (self.config.client_id,), self.policy.algorithms, leeway=self.policy.leeway,
                              required_claims=("iat",), typ="token-introspection+jwt")
        keys = await self._keys(now)
        jws = verify_jws(text.strip(), policy, keys)
        claims = json_object(jws.payload)
        audience = claims.get("aud")
        if claims.get("iss") != self.issuer or self.config.client_id not in (
                audience if isinstance(audience, list) else [audience]):
            raise TokenError("signed introspection response is not from our issuer for us", code="wrong_issuer")
        inner = claims.get("token_introspection")
        if not isinstance(inner, dict):
            raise TokenError("signed introspection response carries no token_introspection", code="malformed_token")
        return inner

    def _answer(self, document: Mapping[str, Any], now: float, client_cert_sha256: str | bytes | None) -> _Answer:
        ceiling = now + self.config.cache_ttl
        active = document.get("active")
        if active is not True:  # RFC 7662 §2.2: "active" REQUIRED boolean; anything else is not active
            return _Answer(None, ceiling)
        claims = dict(document)
        claims.setdefault("iss", self.issuer)
        if "sub" not in claims and isinstance(claims.get("client_id"), str):
            # A client's own token (client credentials) has no user: the client is the subject,
            # as RFC 9068 §2.2 has it for JWT access tokens.
            claims["sub"] = claims["client_id"]
        exp = claims.get("exp")
        if exp is None:
            claims["exp"] = ceiling  # the provider set no end: the cache ceiling is the end
        # The same claim rules as a JWT of this issuer (iss, aud, exp, nbf, iat, cnf), on the answer.
        verified = check_claims(claims, {}, _claims_policy(self.policy), now=now,
                                client_cert_sha256=client_cert_sha256)
        until = min(ceiling, verified.expires_at)
        return _Answer(verified, until)


def _claims_policy(policy: IssuerPolicy) -> IssuerPolicy:
    """An introspection answer need not carry ``sub`` or ``iat`` (RFC 7662 §2.2: OPTIONAL)."""
    return IssuerPolicy(policy.issuer, policy.audiences, policy.algorithms, leeway=policy.leeway, required_claims=(),
                        require_sender_constraint=policy.require_sender_constraint, dpop=policy.dpop)
