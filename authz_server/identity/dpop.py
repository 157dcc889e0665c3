"""DPoP proofs (RFC 9449), checked as a resource server must (§4.3, §7.1), pure: ``now`` is
passed in, the replay cache and the nonce key live with the caller.

A proof is a JWT the client signs, per request, with the key its access token is bound to
(``cnf.jkt``, the RFC 7638 thumbprint of that key). What is checked, in this order:

==========================  ================================================================
``invalid_dpop_proof``      not exactly one well-formed proof; ``typ`` is not ``dpop+jwt``;
                            ``alg`` not an allowed asymmetric one; ``jwk`` missing or private;
                            signature, ``htm``, ``htu``, ``iat`` or ``ath`` do not hold
``use_dpop_nonce``          the server asks for a nonce (§8) and the proof has none, or a stale one
``dpop_replay``             the proof's ``jti`` was seen before (the caller's shared cache)
``dpop_key_mismatch``       the proof is signed by another key than the token or session is bound to
``dpop_required``           a DPoP-bound token or session came without a proof, or as ``Bearer``
==========================  ================================================================

A client's proofs share one header (``typ``, ``alg``, ``jwk``): it is checked, its key parsed
and thumbprinted once per distinct header (a bounded cache), so a client that proves
possession on every call pays for one signature check and the claims, nothing more.
Errors carry the challenge RFC 9449 §7.1 asks for: ``WWW-Authenticate: DPoP error=...,
algs=...``, plus ``DPoP-Nonce`` when a nonce is wanted.

Written here because no maintained Python package checks DPoP proofs for a resource server;
the JOSE parts (key parsing, signature) come from pyjwt through ``jose``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..errors import ReplayError, TokenError
from .encoding import b64url_decode, b64url_encode
from .jose import ALGORITHMS, Jwk, JwkError, JwsAlgorithm, parse_jwk, thumbprint
from .tokens import decode_segment, normalize_typ, split_compact

DPOP_MODES = ("off", "allowed", "required")
PROOF_TYP = "dpop+jwt"
DEFAULT_ALGORITHMS = ("ES256", "ES384", "ES512", "PS256", "RS256", "EdDSA")
MAX_PROOF_BYTES = 8 * 1024
MAX_JTI_CHARS = 256
_KEY_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class DpopSettings:
    """One issuer's ``dpop`` setting. ``iat_window``: how old a proof may be (§11.1: proofs are
    short-lived; the jti cache must remember each one this long). ``nonce``: require
    server-provided nonces (§8), valid for ``nonce_lifetime``."""

    mode: str = "off"
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    iat_window: float = 60.0
    leeway: float = 5.0
    nonce: bool = False
    nonce_lifetime: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in DPOP_MODES:
            raise ValueError(f"dpop must be one of {', '.join(DPOP_MODES)}, got {self.mode!r}")
        for name in self.algorithms:
            if name not in ALGORITHMS or ALGORITHMS[name].symmetric:
                raise ValueError(f"{name!r} is not an asymmetric JWS algorithm (RFC 9449 §4.2)")


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A proof that passed every check but replay: the caller claims ``jti`` until ``remember_until``."""

    jkt: str
    jti: str
    issued_at: float
    remember_until: float


def challenge(code: str, message: str, algorithms: tuple[str, ...], nonce: str | None = None
              ) -> tuple[tuple[str, str], ...]:
    """RFC 9449 §7.1: the ``WWW-Authenticate: DPoP`` challenge (and ``DPoP-Nonce``, §8)."""
    error = "use_dpop_nonce" if code == "use_dpop_nonce" else (
        "invalid_dpop_proof" if code in ("invalid_dpop_proof", "dpop_replay") else "invalid_token")
    description = message.replace('"', "'").replace("\\", "/")[:200]
    value = f'DPoP error="{error}", error_description="{description}", algs="{" ".join(algorithms)}"'
    headers: tuple[tuple[str, str], ...] = (("www-authenticate", value),)
    if nonce is not None:
        headers += (("dpop-nonce", nonce),)
    return headers


def dpop_error(code: str, message: str, settings: DpopSettings,
               nonce: str | None = None) -> TokenError | ReplayError:
    error_class: type[TokenError | ReplayError] = ReplayError if code == "dpop_replay" else TokenError
    return error_class(message, code=code, headers=challenge(code, message, settings.algorithms, nonce))


def access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url SHA-256 of the ASCII access token."""
    return b64url_encode(hashlib.sha256(token.encode("ascii", "replace")).digest())


def normalize_htu(url: str) -> str | None:
    """The URI a proof's ``htu`` is compared by (§4.3 step 9: "without query and fragment
    parts", after RFC 3986 §6.2.2 and §6.2.3 normalization: case of scheme and host, default
    port, empty path). None when it is not an absolute http(s) URI."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != (443 if scheme == "https" else 80):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path or '/'}"


class NonceSource:
    """Stateless server nonces (§8): the time they were made and a MAC over it. Replicas that
    share ``secret`` accept each other's nonces."""

    def __init__(self, secret: bytes | None, lifetime: float) -> None:
        self._secret = secret or os.urandom(32)
        self.lifetime = lifetime

    def issue(self, now: float) -> str:
        stamp = struct.pack(">Q", int(now))
        return b64url_encode(stamp + hmac.new(self._secret, stamp, "sha256").digest()[:16])

    def valid(self, nonce: object, now: float) -> bool:
        if not isinstance(nonce, str) or len(nonce) != 32:
            return False
        try:
            raw = b64url_decode(nonce)
        except ValueError:
            return False
        stamp, mac = raw[:8], raw[8:]
        if not hmac.compare_digest(mac, hmac.new(self._secret, stamp, "sha256").digest()[:16]):
            return False
        made: int = struct.unpack(">Q", stamp)[0]
        return made - 5 <= now <= made + self.lifetime


class ProofChecker:
    """Checks proofs for one issuer's settings (or for DPoP-bound sessions)."""

    def __init__(self, settings: DpopSettings, nonces: NonceSource | None = None) -> None:
        self.settings = settings
        self.nonces = nonces if nonces is not None or not settings.nonce else NonceSource(None,
                                                                                           settings.nonce_lifetime)
        self._headers: dict[str, tuple[JwsAlgorithm, Jwk, str]] = {}

    def _fail(self, message: str, code: str = "invalid_dpop_proof",
              nonce: str | None = None) -> TokenError | ReplayError:
        return dpop_error(code, message, self.settings, nonce)

    def check(self, proof: str | None, *, method: str, url: str, now: float, access_token: str | None = None,
              bound_jkt: str | None = None) -> DpopProof:
        """The proof of one request to ``method url``; ``access_token`` when one came with it
        (its hash must be ``ath``), ``bound_jkt`` the key the token or session is bound to."""
        settings = self.settings
        if proof is None or not proof.strip():
            raise self._fail("this credential is DPoP-bound: send a DPoP proof with it", "dpop_required")
        if "," in proof:
            # §4.3 step 1: "there is not more than one DPoP HTTP request header field"
            raise self._fail("more than one DPoP proof")
        try:
            head, body, sig = split_compact(proof.strip(), MAX_PROOF_BYTES)
        except TokenError as exc:
            raise self._fail(f"DPoP proof: {exc.message}") from None
        # A client's proofs share their header (typ, alg, jwk): it is read once per client.
        known = self._headers.get(head)
        if known is None:
            known = self._header(head)
            if len(self._headers) >= _KEY_CACHE_SIZE:
                self._headers.clear()
            self._headers[head] = known
        alg, jwk, jkt = known
        try:
            signature = b64url_decode(sig)
        except ValueError:
            raise self._fail("the proof's signature is not base64url") from None
        if not alg.verify(jwk.key, f"{head}.{body}".encode("ascii"), signature):
            raise self._fail("the proof's signature does not verify")
        try:
            claims = decode_segment(body, 4096, "DPoP proof payload")
        except TokenError as exc:
            raise self._fail(exc.message) from None
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
            raise self._fail("the proof has no usable jti")
        if claims.get("htm") != method:
            raise self._fail(f"htm {str(claims.get('htm'))[:16]!r} is not the request's method {method}")
        htu = claims.get("htu")
        bare = url.partition("?")[0].partition("#")[0]
        if htu != bare:  # the very text of the request's URI needs no normalizing (the usual case)
            expected = normalize_htu(url)
            if not isinstance(htu, str) or expected is None or normalize_htu(htu) != expected:
                raise self._fail(f"htu {str(htu)[:100]!r} is not the request's URI {expected}")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, (int, float)):
            raise self._fail("the proof has no numeric iat")
        iat = float(iat)
        if not (now - settings.iat_window - settings.leeway <= iat <= now + settings.leeway):
            raise self._fail(f"the proof was made {now - iat:.0f}s ago, outside the {settings.iat_window:.0f}s window",
                             nonce=self.nonces.issue(now) if self.nonces else None)
        if self.nonces is not None and not self.nonces.valid(claims.get("nonce"), now):
            raise self._fail("use the server's DPoP nonce", "use_dpop_nonce", self.nonces.issue(now))
        if access_token is not None:
            ath = claims.get("ath")
            if not isinstance(ath, str) or not hmac.compare_digest(ath, access_token_hash(access_token)):
                raise self._fail("ath does not match the access token sent with the proof")
        if bound_jkt is not None and not hmac.compare_digest(jkt, bound_jkt):
            raise self._fail("the proof is signed by another key than the one the credential is bound to",
                             "dpop_key_mismatch")
        return DpopProof(jkt, jti, iat, iat + settings.iat_window + 2 * settings.leeway)

    def _header(self, head: str) -> tuple[JwsAlgorithm, Jwk, str]:
        """§4.3 steps 4-7 on a proof's header: ``typ``, ``alg``, and a public ``jwk`` that fits it."""
        try:
            header = decode_segment(head, 2048, "DPoP proof header")
        except TokenError as exc:
            raise self._fail(f"DPoP proof: {exc.message}") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or normalize_typ(typ) != PROOF_TYP:
            raise self._fail("the proof's typ is not dpop+jwt")
        name = header.get("alg")
        if not isinstance(name, str) or name not in self.settings.algorithms:
            raise self._fail(f"alg {str(name)[:16]!r} is not allowed for DPoP proofs")
        if "crit" in header:
            raise self._fail("critical header parameters are not supported in DPoP proofs")
        member = header.get("jwk")
        if not isinstance(member, Mapping):
            raise self._fail("the proof carries no jwk header")
        try:
            jwk = parse_jwk(member)  # refuses private members and symmetric keys (§4.3 step 7)
            jkt = thumbprint(member)
        except JwkError as exc:
            raise self._fail(f"the proof's jwk is not a usable public key: {exc}") from None
        alg = ALGORITHMS[name]
        if not jwk.fits(alg):
            raise self._fail(f"the proof's key cannot make {name} signatures")
        return alg, jwk, jkt


_SETTING_KEYS = {"mode", "algorithms", "iat_window", "nonce", "nonce_lifetime", "nonce_secret_file"}


def parse_dpop_setting(value: Any, key: str, *, base_dir: str | None = None) -> tuple[DpopSettings, str | None]:
    """An issuer's ``dpop``: ``off``, ``allowed`` or ``required``, or a mapping with ``mode``
    and ``algorithms``, ``iat_window``, ``nonce`` (true: require server nonces),
    ``nonce_lifetime``, ``nonce_secret_file`` (shared by replicas so each accepts the others'
    nonces). Returns the settings and the secret file's path."""
    from ..errors import ConfigError
    from ..configkeys import only
    from .configread import path, seconds_between, strings

    data: Mapping[str, Any] = {"mode": value} if isinstance(value, str) else value
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected off, allowed, required or a mapping, got {value!r}", key=key)
    only(data, _SETTING_KEYS, f"{key}.")
    changes: dict[str, Any] = {"mode": data.get("mode", "allowed")}
    if changes["mode"] not in DPOP_MODES:
        raise ConfigError(f"expected one of {', '.join(DPOP_MODES)}, got {changes['mode']!r}", key=key)
    if "algorithms" in data:
        changes["algorithms"] = strings(data["algorithms"], f"{key}.algorithms")
    for name in ("iat_window", "nonce_lifetime"):
        if name in data:
            changes[name] = seconds_between(data[name], f"{key}.{name}", 1, 3600, "1s and 1h")
    if "nonce" in data:
        if not isinstance(data["nonce"], bool):
            raise ConfigError(f"expected true or false, got {data['nonce']!r}", key=f"{key}.nonce")
        changes["nonce"] = data["nonce"]
    secret_file = path(data["nonce_secret_file"], f"{key}.nonce_secret_file", base_dir) \
        if "nonce_secret_file" in data else None
    try:
        return DpopSettings(**changes), secret_file
    except ValueError as exc:
        raise ConfigError(str(exc), key=f"{key}.algorithms") from None
