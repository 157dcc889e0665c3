"""``DevIdP``: the dev OIDC provider, in-process or served over HTTP. DEVELOPMENT ONLY.

Endpoints (under the issuer URL's path):

- ``GET  /.well-known/openid-configuration``  provider metadata (OIDC Discovery / RFC 8414)
- ``GET  /jwks``                                the JWK Set, with ``Cache-Control: max-age``
- ``POST /token``                               RFC 6749 token endpoint: ``client_credentials``
  (§4.4) and resource-owner ``password`` (§4.3); client authentication by
  ``client_secret_basic`` or ``client_secret_post`` (§2.3.1); errors as §5.2 says.

Tokens are RFC 9068 JWT access tokens (``typ: at+jwt``) signed RS256 or ES256. The metadata
only lists what exists: there is no authorization endpoint, no ID token, no refresh token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from ..http import HttpRequest, HttpResponse, json_response, serve_http
from .config import DemoClient, DemoUser, DevIdPConfig
from .keys import KeyRing, sign_jwt

log = logging.getLogger("authz_server.devidp")

LEEWAY_AFTER_EXPIRY = 60.0  # retired keys stay published this long after their last token expires


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scope: str
    claims: dict[str, Any]

    def response(self) -> dict[str, Any]:
        body: dict[str, Any] = {"access_token": self.access_token, "token_type": "Bearer",
                                "expires_in": self.expires_in}
        if self.scope:
            body["scope"] = self.scope
        return body


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    def __init__(self, error: str, description: str, status: int = 400, *, basic_challenge: bool = False) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.basic_challenge = basic_challenge

    def response(self) -> HttpResponse:
        headers = [("pragma", "no-cache")]
        if self.basic_challenge:
            # RFC 6749 §5.2: with Basic auth, 401 "MUST include the WWW-Authenticate response header field"
            headers.append(("www-authenticate", 'Basic realm="devidp"'))
        return json_response(self.status, {"error": self.error, "error_description": self.description}, headers)


class DevIdP:
    """A small, real OIDC provider for development, demos and tests. DEVELOPMENT ONLY: demo
    users with plain-text passwords, keys kept in memory, no rate limiting, no consent."""

    def __init__(self, config: DevIdPConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._issuer = config.issuer
        self.keys = KeyRing(config.algorithms, now=clock(), rotation_period=config.key_rotation,
                            publish_ahead=config.key_publish_ahead,
                            keep_after_retire=config.token_ttl + LEEWAY_AFTER_EXPIRY)
        self._users = {u.username: u for u in config.users}
        self._clients = {c.client_id: c for c in config.clients}
        self._server: Any = None
        self.address: str | None = None  # host:port once serving
        self.requests: dict[str, int] = {"discovery": 0, "jwks": 0, "token": 0}

    # -- identity of the provider
    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise RuntimeError("the issuer URL is known once the provider is bound (start) or configured")
        return self._issuer

    def _route(self, suffix: str) -> str:
        return urlsplit(self.issuer).path.rstrip("/") + suffix

    def discovery(self) -> dict[str, Any]:
        scopes = sorted({s for c in self.config.clients for s in c.scopes})
        metadata: dict[str, Any] = {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/jwks",
            "token_endpoint": f"{self.issuer}/token",
            "grant_types_supported": ["client_credentials", "password"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "subject_types_supported": ["public"],
        }
        if scopes:
            metadata["scopes_supported"] = scopes
        return metadata

    def jwks(self) -> dict[str, Any]:
        return self.keys.jwks(self._clock())

    def rotate_keys(self) -> list[str]:
        """Publish a new key per algorithm now; each signs after ``key_publish_ahead``. Returns the new kids."""
        return [k.kid for k in self.keys.rotate(self._clock())]

    # -- tokens
    def issue(self, client_id: str, *, username: str | None = None, scope: str | None = None,
              audience: str | None = None) -> IssuedToken:
        """Mint an access token for a configured client (and user), without HTTP or secrets.

        Grant rules apply as on the token endpoint; raises ``OAuthError``."""
        client = self._clients.get(client_id)
        if client is None:
            raise OAuthError("invalid_client", f"unknown client {client_id!r}", 401)
        user = None
        if username is not None:
            user = self._users.get(username)
            if user is None:
                raise OAuthError("invalid_grant", f"unknown user {username!r}")
        return self._mint(client, user, scope, audience)

    def _mint(self, client: DemoClient, user: DemoUser | None, scope: str | None, audience: str | None) -> IssuedToken:
        grant = "password" if user is not None else "client_credentials"
        if grant not in client.grants:
            raise OAuthError("unauthorized_client", f"client {client.client_id!r} may not use the {grant} grant")
        granted = _granted_scopes(client, scope)
        if audience is not None:
            if audience not in client.audiences:
                # RFC 8707 §2: "invalid_target" for a resource the client may not get a token for
                raise OAuthError("invalid_target", f"audience {audience!r} is not allowed for {client.client_id!r}")
            audiences: tuple[str, ...] = (audience,)
        else:
            audiences = client.audiences
        now = self._clock()
        issued_at = int(now)
        ttl = int(self.config.token_ttl)
        claims: dict[str, Any] = dict(user.claims if user is not None else client.claims)
        # RFC 9068 §2.2: iss, exp, aud, sub, client_id, iat, jti; §2.2.3: scope. For the client
        # credentials grant "sub" identifies the client itself (§2.2).
        claims.update({
            "iss": self.issuer,
            "sub": user.subject if user is not None else client.client_id,
            "aud": audiences[0] if len(audiences) == 1 else list(audiences),
            "exp": issued_at + ttl,
            "iat": issued_at,
            "jti": secrets.token_urlsafe(16),
            "client_id": client.client_id,
        })
        if granted:
            claims["scope"] = granted
        if user is not None:
            claims["auth_time"] = issued_at
        key = self.keys.signing_key(client.algorithm or self.config.default_algorithm, now)
        token = sign_jwt({"typ": "at+jwt"}, claims, key)
        return IssuedToken(token, ttl, granted, claims)

    # -- HTTP
    def handle(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        if path == self._route("/.well-known/openid-configuration"):
            if request.method != "GET":
                return _not_allowed("GET")
            self.requests["discovery"] += 1
            return _cacheable(self.discovery(), self.config.jwks_max_age)
        if path == self._route("/jwks"):
            if request.method != "GET":
                return _not_allowed("GET")
            self.requests["jwks"] += 1
            return _cacheable(self.jwks(), self.config.jwks_max_age)
        if path == self._route("/token"):
            if request.method != "POST":
                return _not_allowed("POST")
            self.requests["token"] += 1
            try:
                return json_response(200, self._token_endpoint(request).response(), [("pragma", "no-cache")])
            except OAuthError as exc:
                return exc.response()
        return json_response(404, {"error": "not_found"})

    def _token_endpoint(self, request: HttpRequest) -> IssuedToken:
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(request.body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(request.body))
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_request", "the body is not a valid form") from None
        form: dict[str, str] = {}
        for name, value in pairs:
            if name in form:
                # RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once."
                raise OAuthError("invalid_request", f"parameter {name!r} is repeated")
            form[name] = value
        client, basic = self._authenticate_client(request, form)
        grant = form.get("grant_type")
        if not grant:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant not in ("client_credentials", "password"):
            raise OAuthError("unsupported_grant_type", f"grant_type {grant[:64]!r} is not supported")
        user = None
        if grant == "password":
            if grant not in client.grants:
                raise OAuthError("unauthorized_client", f"client {client.client_id!r} may not use the password grant")
            username, password = form.get("username"), form.get("password")
            if not username or password is None:
                raise OAuthError("invalid_request", "the password grant needs username and password")
            user = self._users.get(username)
            # RFC 6749 §5.2 invalid_grant: "The provided authorization grant (e.g., ... resource
            # owner credentials) ... is invalid"; both cases answer alike.
            if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
                raise OAuthError("invalid_grant", "invalid username or password")
        return self._mint(client, user, form.get("scope"), form.get("audience"))

    def _authenticate_client(self, request: HttpRequest, form: dict[str, str]) -> tuple[DemoClient, bool]:
        """RFC 6749 §2.3.1: HTTP Basic with form-encoded id and secret, or both in the body;
        "The client MUST NOT use more than one authentication method in each request." """
        header = request.headers.get("authorization", "")
        in_body = "client_secret" in form
        if header:
            if in_body:
                raise OAuthError("invalid_request", "use one client authentication method, not two")
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                raise OAuthError("invalid_client", "client authentication must use HTTP Basic", 401,
                                 basic_challenge=True)
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError("invalid_client", "malformed Basic credentials", 401, basic_challenge=True) from None
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401, basic_challenge=True)
            client_id, secret, basic = unquote_plus(raw_id), unquote_plus(raw_secret), True
            if form.get("client_id") not in (None, client_id):
                raise OAuthError("invalid_request", "client_id in the body differs from the authenticated client")
        elif in_body:
            client_id, secret, basic = form.get("client_id", ""), form["client_secret"], False
        else:
            raise OAuthError("invalid_client", "client authentication is required", 401, basic_challenge=True)
        client = self._clients.get(client_id)
        if client is None or not hmac.compare_digest(client.client_secret.encode(), secret.encode()):
            raise OAuthError("invalid_client", "client authentication failed", 401, basic_challenge=basic)
        return client, basic

    # -- serving
    async def start(self, addr: str | None = None) -> str:
        """Serve on ``addr`` (default: the config's); returns the issuer URL."""
        self._server, bound = await serve_http(self.handle, addr or self.config.addr)
        self.address = bound
        if self._issuer is None:
            self._issuer = f"http://{bound}"
        log.warning("DEVELOPMENT ONLY: dev OIDC provider %s serving on %s with %d demo users and %d clients; "
                    "never use it to protect anything real", self._issuer, bound, len(self._users), len(self._clients))
        return self._issuer

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # From Python 3.12 wait_closed also waits for idle keep-alive clients; do not hang on them.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
            self._server = None
            self.address = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def __aenter__(self) -> "DevIdP":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _granted_scopes(client: DemoClient, requested: str | None) -> str:
    """RFC 6749 §3.3: the requested scope, if the client may have all of it; else the client's
    default (all of its scopes). An unknown scope is ``invalid_scope``."""
    if requested is None or not requested.strip():
        return " ".join(client.scopes)
    wanted = list(dict.fromkeys(requested.split()))
    unknown = [s for s in wanted if s not in client.scopes]
    if unknown:
        raise OAuthError("invalid_scope", f"scope {' '.join(unknown)[:100]!r} is not allowed for {client.client_id!r}")
    return " ".join(wanted)


def _cacheable(payload: dict[str, Any], max_age: float) -> HttpResponse:
    response = json_response(200, payload)
    response.headers = [(n, v) for n, v in response.headers if n != "cache-control"]
    response.headers.append(("cache-control", f"public, max-age={int(max_age)}"))
    return response


def _not_allowed(allow: str) -> HttpResponse:
    return json_response(405, {"error": "method_not_allowed"}, [("allow", allow)])
