"""Browser sign-in: the OpenID Connect authorization code flow with PKCE, run by the ext_authz
check itself on routes whose ``context_extensions`` set ``browser: "true"`` (no extra service).

::

    browser_login:
      issuer: https://idp.example.org     # one of `issuers`, with discovery
      client_id: authz-server
      client_secret_file: secrets/client  # or private_key_jwt: keys/client.jwk (RFC 7523)
      callback_path: /_authz/callback
      logout_path: /_authz/logout
      scopes: [openid, profile, email]
      external_url: https://shop.example.org   # optional: the origin of the redirect URI;
                                                # default: the scheme and host the request came with
      post_logout_path: /                       # where the provider sends the user after logout
      resource: urn:orders                      # optional RFC 8707 resource for the access token
      login_timeout: 10m                        # how long a sign-in may take at the provider

1. A request without a session (or with a stale one) is denied with 302 to the provider's
   ``authorization_endpoint``: ``response_type=code``, PKCE ``S256`` (RFC 7636), a fresh
   ``state`` and ``nonce``. The ``code_verifier``, ``state``, ``nonce`` and where to return are
   kept in a short-lived pre-auth cookie ``__Host-authz-login-<state prefix>`` (one per sign-in,
   so two tabs do not trip over each other), sealed with AES-GCM under a key derived from the
   client credential: every replica can open it, the browser cannot read or forge it.
2. The provider sends the browser to ``callback_path``. The cookie named by the returned
   ``state`` must exist and hold that exact state (CSRF, RFC 6749 §10.12); the state is used
   once (claimed in the session store, shared by replicas, so a replayed callback is refused
   on every replica); the ``iss`` response parameter, when sent, must be the issuer (RFC 9207).
   The code is exchanged with the verifier; the ID token is verified with the issuer's keys
   (``aud`` our client, ``azp``, ``exp``, ``iat``) and must carry our ``nonce``. Then a session
   is made, and the answer is 302 back to the page the user asked for, setting
   ``__Host-authz-session`` (Secure, HttpOnly, SameSite=Lax) and clearing the pre-auth cookie.
3. ``logout_path`` ends the session and sends the browser to the provider's
   ``end_session_endpoint`` (RP-Initiated Logout 1.0) with ``client_id`` and
   ``post_logout_redirect_uri``.

Refusals carry codes: ``login_state_mismatch`` (no pre-auth cookie for that state, or another
state), ``login_expired``, ``login_replayed``, ``login_wrong_issuer``, ``login_denied`` (the
provider reported an error), ``login_failed`` (the code exchange was refused, e.g. a code
stolen from another sign-in fails its PKCE check), ``nonce_mismatch``.

Written here rather than taken from a package because it is the ext_authz check itself that
answers (Python OIDC client packages drive a web framework's request and session objects).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, IdentityError
from ..facts import Facts
from .configread import path, seconds_between, section, strings, url
from .credentials import SESSION_COOKIE, cookie_value, request_uri
from .encoding import b64url_decode, b64url_encode, json_object
from .jose import JwkSet, encode_jwt, parse_jwk
from .tokens import IssuerPolicy, validate_jwt

log = logging.getLogger("authz_server.identity.browser")

LOGIN_COOKIE_PREFIX = "__Host-authz-login-"
_KEYS = {"issuer", "client_id", "client_secret_file", "private_key_jwt", "callback_path", "logout_path", "scopes",
         "external_url", "post_logout_path", "resource", "login_timeout"}
_SAFE_METHODS = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class BrowserLoginConfig:
    issuer: str
    client_id: str
    client_secret_file: str | None = None
    private_key_jwt: str | None = None
    callback_path: str = "/_authz/callback"
    logout_path: str = "/_authz/logout"
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    external_url: str | None = None
    post_logout_path: str = "/"
    resource: str | None = None
    login_timeout: float = 600.0

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: str | None = None, key: str = "browser_login") -> "BrowserLoginConfig":
        data = section(data, key, _KEYS, ("issuer", "client_id"), "issuer, client_id, ...")
        values: dict[str, Any] = {"issuer": url(data["issuer"], f"{key}.issuer", what="issuer"),
                                  "client_id": data["client_id"]}
        secrets_given = [name for name in ("client_secret_file", "private_key_jwt") if name in data]
        if len(secrets_given) != 1:
            raise ConfigError("give exactly one of client_secret_file and private_key_jwt", key=key)
        values[secrets_given[0]] = path(data[secrets_given[0]], f"{key}.{secrets_given[0]}", base_dir)
        for name in ("callback_path", "logout_path", "post_logout_path"):
            if name in data:
                value = data[name]
                if not isinstance(value, str) or not value.startswith("/") or value.startswith("//") or "?" in value:
                    raise ConfigError(f"expected an absolute path like /_authz/callback, got {value!r}",
                                      key=f"{key}.{name}")
                values[name] = value
        if values.get("callback_path", "/_authz/callback") == values.get("logout_path", "/_authz/logout"):
            raise ConfigError("must differ from callback_path", key=f"{key}.logout_path")
        if "scopes" in data:
            values["scopes"] = strings(data["scopes"], f"{key}.scopes")
        if "openid" not in values.get("scopes", ("openid",)):
            raise ConfigError("must include openid (this is an OpenID Connect sign-in)", key=f"{key}.scopes")
        if "external_url" in data:
            external = url(data["external_url"], f"{key}.external_url", what="external_url").rstrip("/")
            if urlsplit(external).path:
                raise ConfigError("expected an origin such as https://shop.example.org (no path)",
                                  key=f"{key}.external_url")
            values["external_url"] = external
        if "resource" in data:
            if not isinstance(data["resource"], str) or not data["resource"]:
                raise ConfigError("expected a resource indicator (an absolute URI)", key=f"{key}.resource")
            values["resource"] = data["resource"]
        if "login_timeout" in data:
            values["login_timeout"] = seconds_between(data["login_timeout"], f"{key}.login_timeout", 30, 3600,
                                                      "30s and 1h")
        return cls(**values)


class SignInRedirect(IdentityError):
    """Not a failure: the answer is a redirect (to the provider, or back after signing in)."""


def _redirect(location: str, code: str, message: str, cookies: tuple[str, ...] = ()) -> SignInRedirect:
    headers = (("location", location), ("cache-control", "no-store"), *(("set-cookie", c) for c in cookies))
    return SignInRedirect(message, code=code, headers=headers, status=302)


def _refuse(code: str, message: str) -> IdentityError:
    return IdentityError(message, code=code)


def quote_all(text: str) -> str:
    return quote(text, safe="")


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2: ``S256``: BASE64URL(SHA256(ASCII(code_verifier)))."""
    return b64url_encode(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass(frozen=True, slots=True)
class _PreAuth:
    state: str
    nonce: str
    verifier: str
    return_to: str
    expires: float


class BrowserLogin:
    """The flow above for one configured provider and client."""

    def __init__(self, config: BrowserLoginConfig, *, metadata: Callable[[], Awaitable[Mapping[str, Any]]],
                 keys: Callable[[float], Awaitable[JwkSet]], policy: IssuerPolicy,
                 claim_once: Callable[[str, float, float], Awaitable[bool]],
                 client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._metadata = metadata
        self._keys = keys
        self._claim_once = claim_once  # (state, until, now) -> first use?
        self._client = client or httpx.AsyncClient(timeout=10.0, follow_redirects=False, trust_env=False)
        self._owns_client = client is None
        self._secret, self._signing_key = _client_credential(config)
        material = self._secret.encode() if self._secret else json.dumps(self._signing_key, sort_keys=True).encode()
        self._aead = AESGCM(HKDF(hashes.SHA256(), 32, salt=config.client_id.encode(),
                                 info=b"authz-server browser_login pre-auth cookie").derive(material))
        # ID tokens: signed by the issuer for this client (OpenID Connect Core §3.1.3.7).
        self._id_policy = IssuerPolicy(config.issuer, (config.client_id,), policy.algorithms, leeway=policy.leeway,
                                       required_claims=("sub", "iat", "nonce"))
        self.sign_ins = 0
        self.refused = 0

    # -- which requests are ours
    def route(self, facts: Facts) -> str | None:
        """``callback`` or ``logout`` when the request is for one of those paths."""
        target = facts.path.split("?", 1)[0]
        if target == self.config.callback_path:
            return "callback"
        if target == self.config.logout_path:
            return "logout"
        return None

    def wants_redirect(self, facts: Facts) -> bool:
        """A page load (GET/HEAD) is sent to sign in; an API call gets 401 instead."""
        return facts.method in _SAFE_METHODS

    def _origin(self, facts: Facts) -> str:
        if self.config.external_url:
            return self.config.external_url
        parts = urlsplit(request_uri(facts))
        return f"{parts.scheme}://{parts.netloc}"

    # -- 1. off to the provider
    async def start(self, facts: Facts, now: float) -> SignInRedirect:
        metadata = await self._provider()
        endpoint = metadata.get("authorization_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            return _redirect("/", "login_unavailable", "the provider publishes no authorization_endpoint")
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        target = facts.path if facts.path.startswith("/") and not facts.path.startswith("//") else "/"
        pre = _PreAuth(state, nonce, verifier, target, now + self.config.login_timeout)
        params = {"response_type": "code", "client_id": self.config.client_id,
                  "redirect_uri": self._origin(facts) + self.config.callback_path,
                  "scope": " ".join(self.config.scopes), "state": state, "nonce": nonce,
                  "code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256"}
        if self.config.resource:
            params["resource"] = self.config.resource
        separator = "&" if "?" in endpoint else "?"
        cookie = (f"{LOGIN_COOKIE_PREFIX}{state[:16]}={self._seal(pre)}; Path=/; Secure; HttpOnly; SameSite=Lax; "
                  f"Max-Age={int(self.config.login_timeout)}")
        return _redirect(endpoint + separator + urlencode(params), "sign_in_required",
                         "sign in at the identity provider", (cookie,))

    # -- 2. back from the provider
    async def finish(self, facts: Facts, now: float,
                     open_session: Callable[[str, Mapping[str, Any]], Awaitable[tuple[str, float]]]) -> SignInRedirect:
        """Complete a sign-in; ``open_session(subject, id_token_claims)`` makes the session and
        returns its id and hard end. Raises ``IdentityError`` on any refusal."""
        try:
            return await self._finish(facts, now, open_session)
        except IdentityError as exc:
            if not isinstance(exc, SignInRedirect):
                self.refused += 1
                log.warning("browser sign-in refused (%s): %s", exc.code, exc.message)
            raise

    async def _finish(self, facts: Facts, now: float,
                      open_session: Callable[[str, Mapping[str, Any]], Awaitable[tuple[str, float]]]
                      ) -> SignInRedirect:
        query = dict(parse_qsl(facts.path.partition("?")[2], keep_blank_values=True))
        state = query.get("state", "")
        if not state or len(state) > 128:
            raise _refuse("login_state_mismatch", "the callback carries no usable state")
        name = f"{LOGIN_COOKIE_PREFIX}{state[:16]}"
        pre = self._open(cookie_value(facts, name), name)
        if pre is None or not hmac.compare_digest(pre.state.encode(), state.encode()):
            # RFC 6749 §10.12: the state must bind the response to this browser's own request.
            raise _refuse("login_state_mismatch", "no sign-in was started in this browser with that state")
        if now >= pre.expires:
            raise _refuse("login_expired", "the sign-in took too long; start again")
        if "error" in query:
            raise _refuse("login_denied", f"the provider answered {query['error'][:64]!r}")
        metadata = await self._provider()
        issuer_param = query.get("iss")
        if issuer_param is not None and issuer_param != self.config.issuer or (
                issuer_param is None and metadata.get("authorization_response_iss_parameter_supported") is True):
            # RFC 9207 §2.4: mix-up defence.
            raise _refuse("login_wrong_issuer", "the authorization response is not from the configured issuer")
        code = query.get("code", "")
        if not code:
            raise _refuse("login_failed", "the callback carries no code")
        if not await self._claim_once(state, pre.expires, now):
            raise _refuse("login_replayed", "this sign-in response was already used")
        tokens = await self._redeem(metadata, code, pre, facts, now)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise _refuse("login_failed", "the token response carries no id_token")
        claims = await self._verify_id_token(id_token, pre, now)
        session_id, ends = await open_session(str(claims["sub"]), claims)
        self.sign_ins += 1
        session_cookie = (f"{SESSION_COOKIE}={session_id}; Path=/; Secure; HttpOnly; SameSite=Lax; "
                          f"Max-Age={max(0, int(ends - now))}")
        clear = f"{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
        return _redirect(pre.return_to, "signed_in", f"signed in as {claims['sub']}", (session_cookie, clear))

    async def _redeem(self, metadata: Mapping[str, Any], code: str, pre: _PreAuth, facts: Facts,
                      now: float) -> Mapping[str, Any]:
        endpoint = metadata.get("token_endpoint")
        if not isinstance(endpoint, str):
            raise _refuse("login_failed", "the provider publishes no token_endpoint")
        form = {"grant_type": "authorization_code", "code": code, "code_verifier": pre.verifier,
                "redirect_uri": self._origin(facts) + self.config.callback_path}
        headers = {"accept": "application/json"}
        if self._secret is not None:
            pair = f"{quote_all(self.config.client_id)}:{quote_all(self._secret)}".encode()
            headers["authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            form.update(self._client_assertion(endpoint, now))
        try:
            response = await self._client.post(endpoint, data=form, headers=headers)
        except httpx.HTTPError as exc:
            raise _refuse("login_failed", f"the token endpoint is unreachable ({type(exc).__name__})") from None
        try:
            body = json_object(response.content)
        except ValueError:
            body = {}
        if response.status_code != 200:
            error = str(body.get("error", f"HTTP {response.status_code}"))[:64]
            raise _refuse("login_failed", f"the provider refused the code ({error})")
        return body

    def _client_assertion(self, audience: str, now: float) -> dict[str, str]:
        """RFC 7523 §2.2 ``private_key_jwt`` client authentication."""
        assert self._signing_key is not None
        key = self._signing_key
        claims = {"iss": self.config.client_id, "sub": self.config.client_id, "aud": audience,
                  "jti": secrets.token_urlsafe(16), "iat": int(now), "exp": int(now) + 60}
        jwk = parse_jwk({k: v for k, v in key.items() if k not in ("d", "p", "q", "dp", "dq", "qi")})
        private = jwt.PyJWK(key).key
        alg = key.get("alg") or {"RSA": "RS256", "EC": {"P-256": "ES256", "P-384": "ES384"}.get(str(jwk.crv)),
                                 "OKP": "EdDSA"}.get(jwk.kty)
        assertion = encode_jwt(claims, private, str(alg), {"kid": key["kid"]} if "kid" in key else {})
        return {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion}

    async def _verify_id_token(self, id_token: str, pre: _PreAuth, now: float) -> dict[str, Any]:
        keys = await self._keys(now)
        try:
            verified = validate_jwt(id_token, self._id_policy, keys, now=now)
        except IdentityError as exc:
            raise _refuse("id_token_invalid", f"the ID token was refused ({exc.code})") from None
        claims = dict(verified.claims)
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"].encode(),
                                                                                pre.nonce.encode()):
            # OpenID Connect Core §3.1.3.7 step 11: the nonce must be the one sent.
            raise _refuse("nonce_mismatch", "the ID token was not issued for this sign-in (nonce)")
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != self.config.client_id:
            raise _refuse("id_token_invalid", "the ID token names several audiences and another azp")
        return claims

    # -- 3. logout
    async def logout(self, facts: Facts, now: float) -> SignInRedirect:
        cleared = f"{SESSION_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
        try:
            metadata = await self._provider()
        except IdentityError:
            metadata = {}
        endpoint = metadata.get("end_session_endpoint")
        back = self._origin(facts) + self.config.post_logout_path
        if not isinstance(endpoint, str):
            return _redirect(back, "signed_out", "signed out", (cleared,))
        params = urlencode({"client_id": self.config.client_id, "post_logout_redirect_uri": back})
        return _redirect(f"{endpoint}{'&' if '?' in endpoint else '?'}{params}", "signed_out", "signed out",
                         (cleared,))

    # -- the pre-auth cookie
    def _seal(self, pre: _PreAuth) -> str:
        nonce = os.urandom(12)
        plain = json.dumps([pre.state, pre.nonce, pre.verifier, pre.return_to, pre.expires],
                           separators=(",", ":")).encode()
        name = f"{LOGIN_COOKIE_PREFIX}{pre.state[:16]}".encode()
        return b64url_encode(nonce + self._aead.encrypt(nonce, plain, name))

    def _open(self, value: str | None, name: str) -> _PreAuth | None:
        if not value or len(value) > 2048:
            return None
        try:
            raw = b64url_decode(value)
            plain = self._aead.decrypt(raw[:12], raw[12:], name.encode())
            state, nonce, verifier, return_to, expires = json.loads(plain)
        except Exception:  # forged, truncated or from another key: not ours
            return None
        return _PreAuth(state, nonce, verifier, return_to, float(expires))

    async def _provider(self) -> Mapping[str, Any]:
        try:
            return await self._metadata()
        except Exception as exc:
            raise _refuse("login_unavailable", f"the provider's metadata is unavailable ({exc})") from None

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _client_credential(config: BrowserLoginConfig) -> tuple[str | None, dict[str, Any] | None]:
    if config.client_secret_file is not None:
        try:
            secret = open(config.client_secret_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {config.client_secret_file}: {exc.strerror}",
                              key="browser_login.client_secret_file") from None
        if len(secret) < 16:
            raise ConfigError("the client secret is shorter than 16 characters", key="browser_login.client_secret_file")
        return secret, None
    assert config.private_key_jwt is not None
    try:
        key = json.loads(open(config.private_key_jwt, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a private JWK from {config.private_key_jwt}: {exc}",
                          key="browser_login.private_key_jwt") from None
    if not isinstance(key, dict) or "d" not in key:
        raise ConfigError("expected a private JWK (with 'd')", key="browser_login.private_key_jwt")
    return None, key


__all__ = ["BrowserLogin", "BrowserLoginConfig", "SignInRedirect", "pkce_challenge"]
