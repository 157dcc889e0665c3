"""Trusted OIDC/JWT issuers: their configuration, where their keys come from, and the
registry that routes a token to its issuer (several issuers at once is federation).

Config (``issuers:``, one entry per issuer; every key is checked, unknown keys are errors)::

    issuers:
      - issuer: https://idp.example.org            # exact iss value; https (http only to loopback)
        audiences: [orders-api]                    # required: at least one
        algorithms: [RS256, ES256]                 # explicit allow-list (default RS256, ES256)
        # keys: one of jwks_file | jwks_uri | discovery (the default:
        #   {issuer}/.well-known/openid-configuration), or shared_secret_file with HS* algorithms
        jwks_file: keys/idp.jwks.json
        leeway: 30s                                # clock skew allowed on exp/nbf/iat
        required_claims: [sub, iat]                # exp, iss and aud are always required
        typ: at+jwt                                # enforce RFC 9068 explicit typing (default: off)
        max_token_bytes: 16384                     # also max_header_bytes, max_payload_bytes
        require_sender_constraint: false           # true: tokens must carry cnf x5t#S256 (RFC 8705)
        dpop: off                                  # allowed | required: cnf.jkt tokens with a DPoP proof
                                                   #   (RFC 9449); or {mode, algorithms, iat_window,
                                                   #   nonce, nonce_lifetime, nonce_secret_file}
        introspection:                             # opaque tokens (RFC 7662); see introspection.py
          client_id: authz-server
          client_secret_file: secrets/introspection
        ca_file: /etc/ssl/idp-ca.pem               # TLS trust for jwks_uri/discovery (default: system)
        tls_verify: true
        refresh:
          default_max_age: 5m                      # freshness without Cache-Control max-age
          min_max_age: 1m                          # bounds applied to the publisher's max-age
          max_max_age: 24h
          unknown_kid_interval: 30s                # at most one unknown-kid refresh per interval
          max_stale: 1h                            # serve the last good set this long past expiry
          retry_interval: 10s                      # after a failed refresh
          timeout: 5s
          max_bytes: 524288                        # cap on a discovery or JWKS document

This module (the registry), ``keysources.py``, ``jwks.py`` and ``introspection.py`` are
identity's network code; validation itself is the pure ``tokens.validate_jwt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import httpx

from ..errors import ConfigError, TokenError
from ..configkeys import only as _only
from .configread import int_between as _int, path as _path, seconds as _seconds, strings as _strings
from .configread import url as _url
from .dpop import DpopSettings, NonceSource, ProofChecker, parse_dpop_setting
from .introspection import IntrospectionConfig, TokenIntrospector
from .jose import ALGORITHMS, SYMMETRIC_ALGORITHMS, JwkError, JwkSet
from .jwks import HttpxJwksFetcher, IssuerKeys, JwksFetcher, KeySetStatus, RefreshSettings
from .keysources import (ClientFetcher, DiscoveryKeySource, FileKeySource, HeldKeySource, SecretKeySource,
                         UriKeySource, fetch_metadata)
from .tokens import (
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_TOKEN_BYTES, IssuerPolicy, VerifiedToken,
    peek_issuer, validate_jwt,
)

DISCOVERY_PATH = "/.well-known/openid-configuration"
_KEYS = {
    "issuer", "audiences", "algorithms", "leeway", "required_claims", "typ", "max_token_bytes", "max_header_bytes",
    "max_payload_bytes", "require_sender_constraint", "jwks_file", "jwks_uri", "discovery", "shared_secret_file",
    "ca_file", "tls_verify", "refresh", "dpop", "introspection",
}
_REFRESH_KEYS = {"default_max_age", "min_max_age", "max_max_age", "unknown_kid_interval", "max_stale",
                 "retry_interval", "timeout", "max_bytes"}


# -- config -----------------------------------------------------------------------------

def _refresh_settings(value: Any, key: str) -> RefreshSettings:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {value!r}", key=key)
    _only(value, _REFRESH_KEYS, f"{key}.")
    changes: dict[str, Any] = {}
    for name in _REFRESH_KEYS - {"max_bytes"}:
        if name in value:
            changes[name] = _seconds(value[name], f"{key}.{name}")
    if "max_bytes" in value:
        changes["max_bytes"] = _int(value["max_bytes"], f"{key}.max_bytes", 1024, 16 * 1024 * 1024)
    settings = RefreshSettings(**changes)
    if settings.min_max_age > settings.max_max_age:
        raise ConfigError("must not exceed max_max_age", key=f"{key}.min_max_age")
    if settings.timeout <= 0:
        raise ConfigError("must be positive", key=f"{key}.timeout")
    return settings


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One ``issuers[]`` entry, checked. ``policy()`` gives the pure validator's view."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ("sub", "iat")
    typ: str | None = None
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    require_sender_constraint: bool = False
    jwks_file: str | None = None
    jwks_uri: str | None = None
    discovery: str | None = None  # set when neither jwks_file, jwks_uri nor a secret is configured
    shared_secret_file: str | None = None
    ca_file: str | None = None
    tls_verify: bool = True
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    dpop: DpopSettings = field(default_factory=DpopSettings)
    dpop_nonce_secret_file: str | None = None
    introspection: IntrospectionConfig | None = None
    key: str = "issuers[0]"  # where in the config this came from, for messages

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], key: str, *, base_dir: str | None = None) -> "IssuerConfig":
        """Parse one ``issuers[]`` entry; ``ConfigError(key="issuers[0].algorithms")`` names the bad key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping with issuer, audiences, ..., got {data!r}", key=key)
        _only(data, _KEYS, f"{key}.")
        if "issuer" not in data:
            raise ConfigError("is required", key=f"{key}.issuer")
        issuer = _url(data["issuer"], f"{key}.issuer", what="issuer")
        if "audiences" not in data:
            raise ConfigError("is required: the audiences this server accepts (RFC 9068 §4)", key=f"{key}.audiences")
        values: dict[str, Any] = {"issuer": issuer, "key": key,
                                  "audiences": _strings(data["audiences"], f"{key}.audiences")}

        algorithms = _strings(data.get("algorithms", ["RS256", "ES256"]), f"{key}.algorithms")
        for name in algorithms:
            if name.lower() == "none":
                raise ConfigError("'none' is never allowed (RFC 8725 §3.2)", key=f"{key}.algorithms")
            if name not in ALGORITHMS:
                raise ConfigError(f"unknown algorithm {name!r}; use one of {', '.join(ALGORITHMS)}",
                                  key=f"{key}.algorithms")
        symmetric = [a for a in algorithms if a in SYMMETRIC_ALGORITHMS]
        if symmetric and len(symmetric) != len(algorithms):
            # RFC 8725 §2.1/§3.1: one issuer, one kind of key; mixing invites key confusion.
            raise ConfigError("mixes HMAC (HS*) with public-key algorithms; an issuer either shares a "
                              "secret or publishes public keys", key=f"{key}.algorithms")
        values["algorithms"] = algorithms

        if "leeway" in data:
            values["leeway"] = _seconds(data["leeway"], f"{key}.leeway")
            if values["leeway"] > 600:
                raise ConfigError("must be at most 10m", key=f"{key}.leeway")
        if "required_claims" in data:
            values["required_claims"] = _strings(data["required_claims"], f"{key}.required_claims", allow_empty=True)
        if "typ" in data and data["typ"] is not None:
            if not isinstance(data["typ"], str) or not data["typ"]:
                raise ConfigError(f"expected a media type such as 'at+jwt', got {data['typ']!r}", key=f"{key}.typ")
            values["typ"] = data["typ"]
        for cap in ("max_token_bytes", "max_header_bytes", "max_payload_bytes"):
            if cap in data:
                values[cap] = _int(data[cap], f"{key}.{cap}", 64, 1024 * 1024)
        for flag in ("require_sender_constraint", "tls_verify"):
            if flag in data:
                if not isinstance(data[flag], bool):
                    raise ConfigError(f"expected true or false, got {data[flag]!r}", key=f"{key}.{flag}")
                values[flag] = data[flag]

        sources = [name for name in ("jwks_file", "jwks_uri", "discovery", "shared_secret_file") if name in data]
        if len(sources) > 1:
            raise ConfigError(f"give one key source, not {' and '.join(sources)}", key=f"{key}.{sources[1]}")
        if symmetric and sources != ["shared_secret_file"]:
            raise ConfigError("HS* algorithms need shared_secret_file (an explicit shared secret)",
                              key=f"{key}.algorithms")
        if "shared_secret_file" in data and not symmetric:
            raise ConfigError("a shared secret is only used with HS* algorithms", key=f"{key}.shared_secret_file")
        if "jwks_file" in data:
            values["jwks_file"] = _path(data["jwks_file"], f"{key}.jwks_file", base_dir)
        elif "jwks_uri" in data:
            values["jwks_uri"] = _url(data["jwks_uri"], f"{key}.jwks_uri", what="jwks_uri")
        elif "shared_secret_file" in data:
            values["shared_secret_file"] = _path(data["shared_secret_file"], f"{key}.shared_secret_file", base_dir)
        else:
            # OpenID Connect Discovery 1.0 §4: "If the Issuer value contains a path component,
            # any terminating / MUST be removed before appending /.well-known/openid-configuration."
            default = issuer.rstrip("/") + DISCOVERY_PATH
            values["discovery"] = _url(data.get("discovery", default), f"{key}.discovery", what="discovery")
        if "ca_file" in data:
            values["ca_file"] = _path(data["ca_file"], f"{key}.ca_file", base_dir)
        if "refresh" in data:
            values["refresh"] = _refresh_settings(data["refresh"], f"{key}.refresh")
        if "dpop" in data:
            values["dpop"], values["dpop_nonce_secret_file"] = parse_dpop_setting(data["dpop"], f"{key}.dpop",
                                                                                base_dir=base_dir)
        if "introspection" in data:
            values["introspection"] = IntrospectionConfig.from_mapping(data["introspection"], f"{key}.introspection",
                                                                       base_dir=base_dir)
        config = cls(**values)
        try:
            config.policy()
        except ValueError as exc:
            raise ConfigError(str(exc), key=key) from None
        return config

    def policy(self) -> IssuerPolicy:
        return IssuerPolicy(
            issuer=self.issuer, audiences=self.audiences, algorithms=self.algorithms, leeway=self.leeway,
            required_claims=self.required_claims, typ=self.typ, max_token_bytes=self.max_token_bytes,
            max_header_bytes=self.max_header_bytes, max_payload_bytes=self.max_payload_bytes,
            require_sender_constraint=self.require_sender_constraint, dpop=self.dpop.mode,
        )


def parse_issuers(value: Any, *, base_dir: str | None = None, key: str = "issuers") -> tuple[IssuerConfig, ...]:
    """The whole ``issuers:`` list; an issuer listed twice is an error."""
    if not isinstance(value, list):
        raise ConfigError(f"expected a list of issuers, got {value!r}", key=key)
    configs = tuple(IssuerConfig.from_mapping(item, f"{key}[{i}]", base_dir=base_dir) for i, item in enumerate(value))
    seen: set[str] = set()
    for config in configs:
        if config.issuer in seen:
            raise ConfigError(f"issuer {config.issuer!r} is listed twice", key=f"{config.key}.issuer")
        seen.add(config.issuer)
    return configs


def _tls(config: IssuerConfig) -> Any:
    if config.tls_verify and config.ca_file:
        import ssl

        return ssl.create_default_context(cafile=config.ca_file)
    return config.tls_verify


def _read_secret(file: str | None, key: str) -> bytes | None:
    if file is None:
        return None  # one process: a random key is enough
    try:
        secret = Path(file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}", key=key) from None
    if len(secret) < 16:
        raise ConfigError("needs at least 16 bytes of secret", key=key)
    return secret


# -- the registry ----------------------------------------------------------------------------

@dataclass(slots=True)
class _Issuer:
    config: IssuerConfig
    policy: IssuerPolicy
    keys: IssuerKeys
    proofs: ProofChecker | None = None  # DPoP on: checks this issuer's cnf.jkt tokens' proofs
    introspector: TokenIntrospector | None = None
    metadata: Mapping[str, Any] | None = None


class IssuerRegistry:
    """Every trusted issuer, routed by ``iss``. Implements the identity resolver's ``validate``.

    ``fetcher`` is shared by all issuers when given; otherwise each issuer gets an
    ``HttpxJwksFetcher`` with its own TLS settings (closed by ``close``). ``held_keys`` gives
    the key set of an issuer whose keys this process holds itself (its own token-exchange
    issuer), in place of the config's key source.
    """

    def __init__(self, configs: Sequence[IssuerConfig], *, fetcher: JwksFetcher | None = None,
                 clock: Callable[[], float] = time.time, held_keys: Mapping[str, JwkSet] | None = None) -> None:
        self._clock = clock
        self._issuers: dict[str, _Issuer] = {}
        self._owned: list[HttpxJwksFetcher] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None  # introspection and metadata, when needed
        now = clock()
        for config in configs:
            if config.issuer in self._issuers:
                raise ConfigError(f"issuer {config.issuer!r} is listed twice", key=f"{config.key}.issuer")
            source: Any
            if held_keys is not None and config.issuer in held_keys:
                source = HeldKeySource(held_keys[config.issuer], f"held by this process ({config.key})")
            elif config.jwks_file is not None:
                source = FileKeySource(config.jwks_file)
            elif config.shared_secret_file is not None:
                source = SecretKeySource(config.shared_secret_file, config.algorithms)
            else:
                used = fetcher or self._own_fetcher(config)
                source = (UriKeySource(config.jwks_uri, used) if config.jwks_uri is not None
                          else DiscoveryKeySource(config.discovery or "", config.issuer, used))
            keys = IssuerKeys(config.issuer, source, config.refresh, clock=clock)
            if source.static:
                # Files and secrets are read at start: a bad one stops the start, naming the key.
                where = "shared_secret_file" if isinstance(source, SecretKeySource) else "jwks_file"
                try:
                    keys.prime(source.read(), now)
                except JwkError as exc:
                    raise ConfigError(str(exc), key=f"{config.key}.{where}") from None
            entry = self._issuers[config.issuer] = _Issuer(config, config.policy(), keys)
            if config.dpop.mode != "off":
                nonces = None
                if config.dpop.nonce:
                    secret = _read_secret(config.dpop_nonce_secret_file, f"{config.key}.dpop.nonce_secret_file")
                    nonces = NonceSource(secret, config.dpop.nonce_lifetime)
                entry.proofs = ProofChecker(config.dpop, nonces)
            if config.introspection is not None:
                if self._http is None:
                    self._http = httpx.AsyncClient(verify=_tls(config), follow_redirects=False, trust_env=False)
                entry.introspector = TokenIntrospector(
                    config.issuer, config.introspection, entry.policy, client=self._http, keys=keys.current,
                    metadata=functools.partial(self.metadata, config.issuer))
        self._introspecting = [e for e in self._issuers.values() if e.introspector is not None]
        self._max_token_bytes = max((c.max_token_bytes for c in configs), default=DEFAULT_MAX_TOKEN_BYTES)
        self._max_payload_bytes = max((c.max_payload_bytes for c in configs), default=DEFAULT_MAX_PAYLOAD_BYTES)

    def _own_fetcher(self, config: IssuerConfig) -> HttpxJwksFetcher:
        fetcher = HttpxJwksFetcher(timeout=config.refresh.timeout, max_bytes=config.refresh.max_bytes,
                                   verify=config.tls_verify, ca_file=config.ca_file)
        self._owned.append(fetcher)
        return fetcher

    @property
    def issuers(self) -> tuple[str, ...]:
        return tuple(self._issuers)

    def keys(self, issuer: str) -> IssuerKeys:
        return self._issuers[issuer].keys

    def proof_checker(self, issuer: str) -> ProofChecker | None:
        """The DPoP proof checker of an issuer with ``dpop`` on, else None."""
        entry = self._issuers.get(issuer)
        return entry.proofs if entry is not None else None

    def policy(self, issuer: str) -> IssuerPolicy:
        return self._issuers[issuer].policy

    async def metadata(self, issuer: str) -> Mapping[str, Any]:
        """The provider's metadata (discovery), fetched once; ``FetchError`` when unavailable."""
        entry = self._issuers[issuer]
        source = entry.keys.source
        if isinstance(source, DiscoveryKeySource):
            return await source.provider_metadata()
        if entry.metadata is None:
            if self._http is None:
                self._http = httpx.AsyncClient(verify=_tls(entry.config), follow_redirects=False, trust_env=False)
            fetcher = ClientFetcher(self._http, entry.config.refresh.max_bytes)
            entry.metadata = await fetch_metadata(fetcher, entry.config.discovery or
                                                  entry.config.issuer.rstrip("/") + DISCOVERY_PATH, entry.config.issuer)
        return entry.metadata

    async def validate(self, token: str, *, now: float,
                       client_cert_sha256: str | bytes | None = None) -> VerifiedToken:
        """Route by the (unverified) ``iss`` to its issuer, then ``validate_jwt`` with that
        issuer's policy and keys. An unknown ``kid`` triggers one rate-limited key refresh and
        a second attempt. A token that is not a JWT goes to the issuers that introspect
        (RFC 7662), in order, until one knows it. Raises ``TokenError`` or ``UnavailableError``."""
        if self._introspecting and token.count(".") != 2:
            return await self._introspect(token, now, client_cert_sha256)
        issuer = peek_issuer(token, max_token_bytes=self._max_token_bytes, max_payload_bytes=self._max_payload_bytes)
        entry = self._issuers.get(issuer)
        if entry is None:
            raise TokenError("the token's issuer is not trusted", code="untrusted_issuer")
        keys = await entry.keys.current(now)
        try:
            return validate_jwt(token, entry.policy, keys, now=now, client_cert_sha256=client_cert_sha256)
        except TokenError as exc:
            if exc.code != "unknown_kid":
                raise
            fresh = await entry.keys.refresh_for_unknown_kid(now)
            if fresh is None or fresh is keys:
                raise
        return validate_jwt(token, entry.policy, fresh, now=now, client_cert_sha256=client_cert_sha256)

    async def _introspect(self, token: str, now: float, client_cert_sha256: str | bytes | None) -> VerifiedToken:
        if len(token) > self._max_token_bytes:
            raise TokenError(f"token of {len(token)} bytes is over the limit", code="token_too_large")
        last: TokenError | None = None
        for entry in self._introspecting:
            assert entry.introspector is not None
            try:
                return await entry.introspector.introspect(token, now=now, client_cert_sha256=client_cert_sha256)
            except TokenError as exc:
                if exc.code != "token_inactive":
                    raise
                last = exc
        assert last is not None
        raise last

    async def start(self) -> None:
        """Load every remote key set once (failures are reported in ``status``, not raised) and
        start the background refreshers."""
        now = self._clock()
        remote = [e.keys for e in self._issuers.values() if not e.keys.source.static]
        await asyncio.gather(*(keys.refresh(now) for keys in remote))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(keys.run(), name=f"jwks refresher {keys.issuer}") for keys in remote]

    @property
    def ready(self) -> bool:
        """Every issuer has a usable key set."""
        now = self._clock()
        return all(e.keys.status(now).available for e in self._issuers.values())

    async def refresh(self, issuer: str, *, now: float | None = None) -> KeySetStatus:
        entry = self._issuers[issuer]
        await entry.keys.refresh(now)
        return entry.keys.status(now)

    async def wait_idle(self) -> None:
        await asyncio.gather(*(e.keys.wait_idle() for e in self._issuers.values()))

    def status(self, now: float | None = None) -> list[KeySetStatus]:
        return [e.keys.status(now) for e in self._issuers.values()]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for entry in self._issuers.values():
            await entry.keys.cancel()
        for fetcher in self._owned:
            await fetcher.aclose()
        self._owned.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> "IssuerRegistry":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
