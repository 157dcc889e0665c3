"""JOSE keys and algorithms, from pyjwt: JWK parsing (``PyJWK``), JWK export (``to_jwk``), and
the JWS sign and verify operations (``PyJWS`` algorithm objects). What stays ours is policy:

* the allow-list: which ``alg`` names exist here and which key family each one needs
  (RFC 8725 §3.1: "Each key MUST be used with exactly one algorithm"); there is no ``none``
  (RFC 8725 §3.2). A key of another family is refused before any cryptography runs, which is
  what defeats the RS256 → HS256 key-confusion attack (§2.1): a public key is never an HMAC
  secret;
* what a published key set may hold: public keys only, no HMAC secrets, RSA of 2048 bits or
  more (RFC 7518 §3.3), at most ``MAX_KEYS`` keys, ``kid`` as an opaque string;
* RFC 7638 thumbprints (``kid`` of our own keys, DPoP ``jkt``), which pyjwt does not compute.

Chosen over joserfc by measurement (``tests/bench/bench_jose.py``): the signature check
costs the same in both (both call pyca/cryptography), pyjwt parses a JWK several times
faster, and it already signs the token-exchange tokens. Compact serialization is parsed
strictly by ``tokens`` before the library sees anything (``encoding``: one spelling per value).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import PyJWTError

from .encoding import b64url_encode, jwk_set_document

# RFC 7518 §3.3: "A key of size 2048 bits or larger MUST be used with these algorithms."
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384  # a larger modulus is a verification-cost attack, not a key
MAX_KEYS = 100  # keys read from one set; the rest are skipped (a set this size is an attack)
MAX_KID_LENGTH = 256
OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_LIBRARY = jwt.PyJWS()

# Private members by key type (RFC 7518 §6.2.2, §6.3.2; RFC 8037 §2): a published set that
# carries them has leaked its signing key, and that key must not be trusted.
_PRIVATE_MEMBERS = {"RSA": ("d", "p", "q", "dp", "dq", "qi", "oth"), "EC": ("d",), "OKP": ("d",)}


class JwkError(ValueError):
    """A key or key set that cannot be used. Translated where it is caught: a configured file
    becomes a ``ConfigError``, a fetched set a failed refresh that keeps the last good set."""


@dataclass(frozen=True, slots=True)
class JwsAlgorithm:
    """One ``alg`` value of the allow-list: the key family it needs, and pyjwt's implementation."""

    name: str
    kty: str  # "RSA", "EC", "OKP" or "oct" (RFC 7518 §6.1)
    crv: str | None = None  # the one curve an ECDSA alg is defined on (RFC 7518 §3.4)
    min_secret: int = 0  # oct: RFC 7518 §3.2, "a key of the same size as the hash output ... or larger"
    _impl: Any = field(default=None, repr=False, compare=False)

    @property
    def symmetric(self) -> bool:
        return self.kty == "oct"

    def fits(self, kty: str, crv: str | None, key: Any) -> bool:
        """Does a key of this type (and curve) belong to this algorithm's family? Nothing else may be used."""
        if kty != self.kty:
            return False
        if kty == "RSA":
            return isinstance(key, rsa.RSAPublicKey)
        if kty == "EC":
            return crv == self.crv and isinstance(key, ec.EllipticCurvePublicKey)
        if kty == "OKP":
            return crv in OKP_CURVES and isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        return isinstance(key, bytes) and len(key) >= self.min_secret

    def verify(self, key: Any, signing_input: bytes, signature: bytes) -> bool:
        """True when ``signature`` is this algorithm's signature of ``signing_input`` under ``key``
        (which the caller has matched with ``fits``). Malformed signatures are False, never an error."""
        if not signature:
            return False
        if self.kty == "RSA" and len(signature) != (key.key_size + 7) // 8:
            return False  # RFC 8017 §8.2.2 step 1: exactly k octets, k the modulus length
        try:
            return bool(self._impl.verify(signing_input, key, signature))
        except (ValueError, TypeError, PyJWTError):
            return False

    def sign(self, private_key: Any, signing_input: bytes) -> bytes:
        signature: bytes = self._impl.sign(signing_input, private_key)
        return signature


def _algorithm(name: str, kty: str, crv: str | None = None, min_secret: int = 0) -> JwsAlgorithm:
    return JwsAlgorithm(name, kty, crv, min_secret, _LIBRARY.get_algorithm_by_name(name))


ALGORITHMS: Mapping[str, JwsAlgorithm] = MappingProxyType({a.name: a for a in (
    _algorithm("RS256", "RSA"), _algorithm("RS384", "RSA"), _algorithm("RS512", "RSA"),
    _algorithm("PS256", "RSA"), _algorithm("PS384", "RSA"), _algorithm("PS512", "RSA"),
    _algorithm("ES256", "EC", "P-256"), _algorithm("ES384", "EC", "P-384"), _algorithm("ES512", "EC", "P-521"),
    _algorithm("EdDSA", "OKP"),
    _algorithm("HS256", "oct", min_secret=32), _algorithm("HS384", "oct", min_secret=48),
    _algorithm("HS512", "oct", min_secret=64),
)})
SYMMETRIC_ALGORITHMS = frozenset(name for name, a in ALGORITHMS.items() if a.symmetric)


def sign(alg: str, private_key: Any, signing_input: bytes) -> bytes:
    """``alg``'s raw signature of ``signing_input`` (for tests that build malformed tokens)."""
    return ALGORITHMS[alg].sign(private_key, signing_input)


def encode_jwt(claims: Mapping[str, Any], private_key: Any, alg: str, header: Mapping[str, Any]) -> str:
    """A compact JWS of ``claims``: every token this product signs (token exchange, the dev
    OIDC provider, JWT-SVIDs) is made here, by pyjwt."""
    if alg not in ALGORITHMS:
        raise ValueError(f"{alg!r} is not an algorithm this product signs with")
    return jwt.encode(dict(claims), private_key, algorithm=alg, headers=dict(header))


@dataclass(frozen=True, slots=True)
class Jwk:
    """One verification key: its public key object (or, for ``oct``, the secret bytes)."""

    kty: str
    key: Any = field(repr=False)
    kid: str | None = None
    alg: str | None = None
    use: str | None = None
    key_ops: tuple[str, ...] | None = None
    crv: str | None = None

    def fits(self, alg: JwsAlgorithm) -> bool:
        """May this key verify a signature made with ``alg``? RFC 7517 §4.4: a key that names
        its ``alg`` is for that algorithm only; §4.2/§4.3: ``use`` must be ``sig`` and
        ``key_ops`` must include ``verify`` when present."""
        if self.alg is not None and self.alg != alg.name:
            return False
        if self.use is not None and self.use != "sig":
            return False
        if self.key_ops is not None and "verify" not in self.key_ops:
            return False
        return alg.fits(self.kty, self.crv, self.key)


@dataclass(frozen=True, slots=True)
class JwkSet:
    """The usable keys of one issuer, plus why each unusable key was left out."""

    keys: tuple[Jwk, ...]
    skipped: tuple[str, ...] = ()
    _by_kid: Mapping[str, tuple[Jwk, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, list[Jwk]] = {}
        for jwk in self.keys:
            if jwk.kid is not None:
                index.setdefault(jwk.kid, []).append(jwk)
        object.__setattr__(self, "_by_kid", {kid: tuple(keys) for kid, keys in index.items()})

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._by_kid)

    def with_kid(self, kid: str) -> tuple[Jwk, ...]:
        """Keys whose ``kid`` equals ``kid`` exactly: a dictionary lookup, nothing more
        (no path, no query, no case folding; RFC 7515 §4.1.4 "kid" is case-sensitive)."""
        return self._by_kid.get(kid, ())

    def fitting(self, alg: JwsAlgorithm) -> tuple[Jwk, ...]:
        return tuple(jwk for jwk in self.keys if jwk.fits(alg))

    @classmethod
    def shared_secret(cls, secret: bytes, *, kid: str | None = None, alg: str | None = None) -> "JwkSet":
        """An issuer configured with an HMAC secret, explicitly (never from a published set)."""
        if not isinstance(secret, bytes):
            raise JwkError("a shared secret must be bytes")
        shortest = min(a.min_secret for a in ALGORITHMS.values() if a.symmetric and alg in (None, a.name))
        if len(secret) < shortest:
            raise JwkError(f"a shared secret needs at least {shortest} bytes (RFC 7518 §3.2), got {len(secret)}")
        return cls((Jwk("oct", secret, kid=kid, alg=alg, use="sig"),))


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise JwkError(f"member {name!r} must be a string")
    return value


def parse_jwk(data: Mapping[str, Any], *, allow_symmetric: bool = False) -> Jwk:
    """One public JWK → ``Jwk``; raises ``JwkError`` naming what is wrong with it."""
    if not isinstance(data, Mapping):
        raise JwkError("a JWK must be a JSON object")
    kty = data.get("kty")
    kid = _optional_str(data, "kid")
    if kid is not None and not (0 < len(kid) <= MAX_KID_LENGTH):
        raise JwkError(f"kid of length {len(kid)} is not usable")
    alg, use, crv = _optional_str(data, "alg"), _optional_str(data, "use"), _optional_str(data, "crv")
    ops = data.get("key_ops")
    if ops is not None and not (isinstance(ops, list) and all(isinstance(o, str) for o in ops)):
        raise JwkError("member 'key_ops' must be a list of strings")
    if alg is not None and alg not in ALGORITHMS:
        raise JwkError(f"alg {alg[:32]!r} is not a JWS algorithm this server verifies")
    if kty in _PRIVATE_MEMBERS and any(m in data for m in _PRIVATE_MEMBERS[kty]):
        raise JwkError("carries private key material; a published key set must hold public keys only")
    if kty == "oct" and not allow_symmetric:
        raise JwkError("symmetric ('oct') keys are never taken from a published key set")
    family = {"RSA": "RS256", "EC": {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(crv or ""),
              "OKP": "EdDSA" if crv in OKP_CURVES else None, "oct": "HS256"}.get(str(kty))
    if kty not in ("RSA", "EC", "OKP", "oct"):
        raise JwkError(f"key type {str(kty)[:16]!r} is not supported")
    if family is None:
        raise JwkError(f"{kty} curve {str(crv)[:16]!r} is not supported")
    try:  # the library builds the key (and refuses EC points that are not on the curve)
        key = jwt.PyJWK(dict(data), algorithm=family).key
    except (PyJWTError, ValueError, TypeError) as exc:
        raise JwkError(f"{kty} key refused: {exc}") from None
    if kty == "RSA":
        numbers = key.public_numbers()
        if not MIN_RSA_BITS <= numbers.n.bit_length() <= MAX_RSA_BITS:
            raise JwkError(f"RSA modulus of {numbers.n.bit_length()} bits (RFC 7518 §3.3 requires 2048 or more)")
        if numbers.e < 3 or numbers.e % 2 == 0 or numbers.e.bit_length() > 64:
            raise JwkError("RSA public exponent is not a usable odd value")
    jwk = Jwk(str(kty), key, kid=kid, alg=alg, use=use, key_ops=tuple(ops) if ops is not None else None, crv=crv)
    if alg is not None and not ALGORITHMS[alg].fits(jwk.kty, crv, key):
        raise JwkError(f"declares alg {alg} but is a {kty} key{f' on {crv}' if crv else ''}")
    return jwk


def parse_jwks(document: bytes | str | Mapping[str, Any], *, max_keys: int = MAX_KEYS,
               allow_symmetric: bool = False) -> JwkSet:
    """A JWK Set (RFC 7517 §5) → ``JwkSet``, read the way pyjwt's ``PyJWKSet`` reads one:
    unusable keys are skipped with a reason (kept for the status page); a set with no usable
    key at all is an error (so a refresh never replaces good keys with none)."""
    try:
        _, keys = jwk_set_document(document)
    except ValueError as exc:
        raise JwkError(f"not a JWK Set: {exc}") from None
    usable: list[Jwk] = []
    skipped: list[str] = []
    for index, entry in enumerate(keys):
        kid = entry.get("kid") if isinstance(entry, Mapping) else None
        label = f"keys[{index}]" + (f" (kid {str(kid)[:64]!r})" if kid is not None else "")
        if index >= max_keys:
            skipped.append(f"{label}: more than {max_keys} keys in the set")
            continue
        try:
            usable.append(parse_jwk(entry, allow_symmetric=allow_symmetric))
        except JwkError as exc:
            skipped.append(f"{label}: {exc}")
    if not usable:
        reasons = "; ".join(skipped[:5]) or "the set is empty"
        raise JwkError(f"no usable key in the JWK Set ({reasons})")
    return JwkSet(tuple(usable), tuple(skipped))


def load_jwks(path: str | Path) -> JwkSet:
    """Read a JWK Set file (``issuers[].jwks_file``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise JwkError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    return parse_jwks(data)


def public_jwk(public_key: Any, *, alg: str | None = None, kid: str | None = None, use: str = "sig") -> dict[str, Any]:
    """The public JWK members for a public key (what an issuer publishes), ``kid`` defaulting
    to its RFC 7638 thumbprint."""
    if isinstance(public_key, rsa.RSAPublicKey):
        exported = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise JwkError(f"curve {public_key.curve.name} has no JOSE name")
        exported = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        exported = jwt.algorithms.OKPAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        raise JwkError(f"cannot publish a {type(public_key).__name__}")
    out: dict[str, Any] = {name: exported[name] for name in ("kty", "crv", "n", "e", "x", "y") if name in exported}
    out["kid"] = kid if kid is not None else thumbprint(out)
    out["use"] = use
    if alg is not None:
        out["alg"] = alg
    return out


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK Thumbprint (SHA-256, base64url): the required members only, in
    lexicographic order, no whitespace."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"),
                "oct": ("k", "kty")}.get(str(jwk.get("kty")))
    if required is None or not all(isinstance(jwk.get(name), str) for name in required):
        raise JwkError(f"no thumbprint for key type {str(jwk.get('kty'))[:16]!r} with these members")
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(canonical.encode()).digest())
