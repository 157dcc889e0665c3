"""JSON Web Keys (RFC 7517) and key sets: public verification keys parsed once, looked up by
``kid`` as an opaque string.

A key set published by an issuer is read the way pyjwt's ``PyJWKSet`` reads one: a key this
product cannot use (unknown type, weak, private material, symmetric) is skipped with a
reason kept for the status page, and the rest of the set still works. Shared HMAC secrets
never come from a published set; they are configured explicitly (``JwkSet.shared_secret``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .encoding import b64url_decode, b64url_encode, jwk_set_document
from .jwa import ALGORITHMS, EC_CURVES, MAX_RSA_BITS, MIN_RSA_BITS, OKP_CURVES, JwsAlgorithm, hmac_min_bytes, key_fits

MAX_KEYS = 100  # keys read from one set; the rest are skipped (a set this size is an attack)
MAX_KID_LENGTH = 256

# Private members by key type (RFC 7518 §6.2.2, §6.3.2; RFC 8037 §2): a published set that
# carries them has leaked its signing key, and that key must not be trusted.
_PRIVATE_MEMBERS = {"RSA": ("d", "p", "q", "dp", "dq", "qi", "oth"), "EC": ("d",), "OKP": ("d",)}


class JwkError(ValueError):
    """A key or key set that cannot be used. Translated where it is caught: a configured file
    becomes a ``ConfigError``, a fetched set a failed refresh that keeps the last good set."""


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
        """May this key verify a signature made with ``alg``?

        RFC 8725 §3.1: "Each key MUST be used with exactly one algorithm"; RFC 7517 §4.4: a
        key that names its ``alg`` is for that algorithm only; §4.2/§4.3: ``use`` must be
        ``sig`` and ``key_ops`` must include ``verify`` when present.
        """
        if self.alg is not None and self.alg != alg.name:
            return False
        if self.use is not None and self.use != "sig":
            return False
        if self.key_ops is not None and "verify" not in self.key_ops:
            return False
        return key_fits(alg, self.kty, self.crv, self.key)


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
        shortest = min(hmac_min_bytes(a) for a in ALGORITHMS.values() if a.symmetric and (alg in (None, a.name)))
        if len(secret) < shortest:
            raise JwkError(f"a shared secret needs at least {shortest} bytes (RFC 7518 §3.2), got {len(secret)}")
        return cls((Jwk("oct", secret, kid=kid, alg=alg, use="sig"),))


def _member(data: Mapping[str, Any], name: str) -> bytes:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise JwkError(f"member {name!r} is missing or not a string")
    try:
        return b64url_decode(value)
    except ValueError as exc:
        raise JwkError(f"member {name!r}: {exc}") from None


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
    alg = _optional_str(data, "alg")
    use = _optional_str(data, "use")
    ops = data.get("key_ops")
    if ops is not None and not (isinstance(ops, list) and all(isinstance(o, str) for o in ops)):
        raise JwkError("member 'key_ops' must be a list of strings")
    key_ops = tuple(ops) if ops is not None else None
    if alg is not None and alg not in ALGORITHMS:
        raise JwkError(f"alg {alg[:32]!r} is not a JWS algorithm this server verifies")
    if kty in _PRIVATE_MEMBERS and any(m in data for m in _PRIVATE_MEMBERS[kty]):
        raise JwkError("carries private key material; a published key set must hold public keys only")
    crv = _optional_str(data, "crv")
    key: Any
    if kty == "RSA":
        n = int.from_bytes(_member(data, "n"), "big")
        e = int.from_bytes(_member(data, "e"), "big")
        bits = n.bit_length()
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise JwkError(f"RSA modulus of {bits} bits (RFC 7518 §3.3 requires 2048 or more)")
        if e < 3 or e % 2 == 0 or e.bit_length() > 64:
            raise JwkError("RSA public exponent is not a usable odd value")
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise JwkError(f"RSA key refused: {exc}") from None
    elif kty == "EC":
        if crv not in EC_CURVES:
            raise JwkError(f"EC curve {str(crv)[:16]!r} is not P-256, P-384 or P-521")
        curve_cls, size, _ = EC_CURVES[crv]
        x, y = _member(data, "x"), _member(data, "y")
        # RFC 7518 §6.2.1.2: "The length of this octet string MUST be the full size of a coordinate"
        if len(x) != size or len(y) != size:
            raise JwkError(f"EC coordinates for {crv} must be {size} octets each")
        try:  # refuses points that are not on the curve (invalid-curve attacks)
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                curve_cls()).public_key()
        except ValueError:
            raise JwkError(f"EC point is not on {crv}") from None
    elif kty == "OKP":
        if crv not in OKP_CURVES:
            raise JwkError(f"OKP curve {str(crv)[:16]!r} is not Ed25519 or Ed448")
        x = _member(data, "x")
        try:
            key = (ed25519.Ed25519PublicKey if crv == "Ed25519" else ed448.Ed448PublicKey).from_public_bytes(x)
        except ValueError as exc:
            raise JwkError(f"{crv} key refused: {exc}") from None
    elif kty == "oct":
        if not allow_symmetric:
            raise JwkError("symmetric ('oct') keys are never taken from a published key set")
        key = _member(data, "k")
    else:
        raise JwkError(f"key type {str(kty)[:16]!r} is not supported")
    jwk = Jwk(kty, key, kid=kid, alg=alg, use=use, key_ops=key_ops, crv=crv)
    if alg is not None and not key_fits(ALGORITHMS[alg], kty, crv, key):
        raise JwkError(f"declares alg {alg} but is a {kty} key{f' on {crv}' if crv else ''}")
    return jwk


def parse_jwks(document: bytes | str | Mapping[str, Any], *, max_keys: int = MAX_KEYS,
               allow_symmetric: bool = False) -> JwkSet:
    """A JWK Set (RFC 7517 §5) → ``JwkSet``. Unusable keys are skipped with a reason; a set
    with no usable key at all is an error (so a refresh never replaces good keys with none)."""
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
    """The public JWK members for a pyca/cryptography public key (what an issuer publishes)."""
    out: dict[str, Any]
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        out = {"kty": "RSA", "n": b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
               "e": b64url_encode(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))}
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(public_key.curve.name)
        if crv is None:
            raise JwkError(f"curve {public_key.curve.name} has no JOSE name")
        size = EC_CURVES[crv][1]
        point = public_key.public_numbers()
        out = {"kty": "EC", "crv": crv, "x": b64url_encode(point.x.to_bytes(size, "big")),
               "y": b64url_encode(point.y.to_bytes(size, "big"))}
    elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        crv = "Ed25519" if isinstance(public_key, ed25519.Ed25519PublicKey) else "Ed448"
        out = {"kty": "OKP", "crv": crv, "x": b64url_encode(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))}
    else:
        raise JwkError(f"cannot publish a {type(public_key).__name__}")
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
    if required is None:
        raise JwkError(f"no thumbprint for key type {jwk.get('kty')!r}")
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(canonical.encode()).digest())
