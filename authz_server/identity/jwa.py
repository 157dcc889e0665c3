"""JSON Web Algorithms (RFC 7518 §3, RFC 8037) for JWS: which key fits which ``alg``, and the
raw sign and verify operations, on pyca/cryptography.

There is no ``none`` here: an unsecured JWS is not an algorithm this product knows
(RFC 8725 §3.2: "The "none" algorithm should only be used when the JWT is cryptographically
protected by other means", which never holds for a bearer token).

Each algorithm names the key type it needs. Verification refuses a key of another type
before any cryptography runs, which is what defeats the RS256 → HS256 key-confusion attack
(RFC 8725 §2.1): a public key is never an HMAC secret.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

# RFC 7518 §3.3: "A key of size 2048 bits or larger MUST be used with these algorithms."
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384  # a larger modulus is a verification-cost attack, not a key

# Group orders of the NIST curves (FIPS 186-4 D.1.2); r and s must lie in [1, n-1].
EC_CURVES: Mapping[str, tuple[type[ec.EllipticCurve], int, int]] = MappingProxyType({
    # crv: (curve class, coordinate/scalar length in octets, group order n)
    "P-256": (ec.SECP256R1, 32,
              0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551),
    "P-384": (ec.SECP384R1, 48,
              0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973),
    "P-521": (ec.SECP521R1, 66,
              0x01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409),
})
OKP_CURVES = frozenset({"Ed25519", "Ed448"})


@dataclass(frozen=True, slots=True)
class JwsAlgorithm:
    """One ``alg`` value: the key type it needs and how it signs."""

    name: str
    kty: str  # "RSA", "EC", "OKP" or "oct" (RFC 7518 §6.1)
    hash_name: str | None  # "sha256", ...; None for EdDSA
    crv: str | None = None  # the one curve an ECDSA alg is defined on (RFC 7518 §3.4)
    pss: bool = False

    @property
    def symmetric(self) -> bool:
        return self.kty == "oct"

    def _hash(self) -> hashes.HashAlgorithm:
        return {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}[self.hash_name or ""]()


ALGORITHMS: Mapping[str, JwsAlgorithm] = MappingProxyType({
    a.name: a for a in (
        JwsAlgorithm("RS256", "RSA", "sha256"), JwsAlgorithm("RS384", "RSA", "sha384"),
        JwsAlgorithm("RS512", "RSA", "sha512"),
        JwsAlgorithm("PS256", "RSA", "sha256", pss=True), JwsAlgorithm("PS384", "RSA", "sha384", pss=True),
        JwsAlgorithm("PS512", "RSA", "sha512", pss=True),
        JwsAlgorithm("ES256", "EC", "sha256", "P-256"), JwsAlgorithm("ES384", "EC", "sha384", "P-384"),
        JwsAlgorithm("ES512", "EC", "sha512", "P-521"),
        JwsAlgorithm("EdDSA", "OKP", None),
        JwsAlgorithm("HS256", "oct", "sha256"), JwsAlgorithm("HS384", "oct", "sha384"),
        JwsAlgorithm("HS512", "oct", "sha512"),
    )
})
SYMMETRIC_ALGORITHMS = frozenset(name for name, a in ALGORITHMS.items() if a.symmetric)


def hmac_min_bytes(alg: JwsAlgorithm) -> int:
    """RFC 7518 §3.2: "A key of the same size as the hash output (for instance, 256 bits for
    "HS256") or larger MUST be used with this algorithm." """
    return hashlib.new(alg.hash_name or "sha256").digest_size


def key_fits(alg: JwsAlgorithm, kty: str, crv: str | None, key: Any) -> bool:
    """Does a key of this type (and curve) belong to ``alg``'s family? Nothing else may be used."""
    if kty != alg.kty:
        return False
    if alg.kty == "RSA":
        return isinstance(key, rsa.RSAPublicKey)
    if alg.kty == "EC":
        return crv == alg.crv and isinstance(key, ec.EllipticCurvePublicKey)
    if alg.kty == "OKP":
        return crv in OKP_CURVES and isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return isinstance(key, bytes) and len(key) >= hmac_min_bytes(alg)


def verify(alg: JwsAlgorithm, key: Any, signing_input: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``alg``'s signature of ``signing_input`` under ``key``.

    The caller has already checked ``key_fits``; a mismatched key here simply fails.
    """
    try:
        if alg.kty == "RSA":
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            # RFC 8017 §8.2.2 step 1: the signature is exactly k octets, k the modulus length.
            if len(signature) != (key.key_size + 7) // 8:
                return False
            if alg.pss:
                # RFC 7518 §3.5: "The size of the salt value is the same size as the hash function output."
                pad: padding.AsymmetricPadding = padding.PSS(mgf=padding.MGF1(alg._hash()),
                                                             salt_length=alg._hash().digest_size)
            else:
                pad = padding.PKCS1v15()
            key.verify(signature, signing_input, pad, alg._hash())
            return True
        if alg.kty == "EC":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            _, size, order = EC_CURVES[alg.crv or ""]
            # RFC 7518 §3.4: the signature is R and S, each exactly the curve's octet length,
            # concatenated; no DER, no shorter or longer forms.
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            # ECDSA verification, SEC 1 §4.1.4 step 1: r and s must be integers in [1, n-1].
            # Skipping this is CVE-2022-21449 ("psychic signatures": r = s = 0 verifies).
            if not (0 < r < order and 0 < s < order):
                return False
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(alg._hash()))
            return True
        if alg.kty == "OKP":
            if not isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
                return False
            key.verify(signature, signing_input)
            return True
        if alg.kty == "oct":
            if not isinstance(key, bytes):
                return False
            expected = hmac.new(key, signing_input, alg.hash_name or "sha256").digest()
            return hmac.compare_digest(expected, signature)  # constant time (RFC 7515 §10.14)
    except InvalidSignature:
        return False
    except ValueError:  # malformed input the backend refuses (e.g. bad point encoding)
        return False
    return False


def sign(alg: JwsAlgorithm | str, private_key: Any, signing_input: bytes) -> bytes:
    """``alg``'s signature of ``signing_input`` (used by the dev OIDC provider and the tests)."""
    if isinstance(alg, str):
        alg = ALGORITHMS[alg]
    if alg.kty == "RSA":
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise TypeError(f"{alg.name} needs an RSA private key")
        if alg.pss:
            pad: padding.AsymmetricPadding = padding.PSS(mgf=padding.MGF1(alg._hash()),
                                                         salt_length=alg._hash().digest_size)
        else:
            pad = padding.PKCS1v15()
        return private_key.sign(signing_input, pad, alg._hash())
    if alg.kty == "EC":
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{alg.name} needs an EC private key")
        curve_cls, size, _ = EC_CURVES[alg.crv or ""]
        if not isinstance(private_key.curve, curve_cls):
            raise TypeError(f"{alg.name} needs a key on {alg.crv}")
        r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(alg._hash())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if alg.kty == "OKP":
        if not isinstance(private_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            raise TypeError("EdDSA needs an Ed25519 or Ed448 private key")
        return private_key.sign(signing_input)
    if not isinstance(private_key, bytes):
        raise TypeError(f"{alg.name} needs the shared secret as bytes")
    return hmac.new(private_key, signing_input, alg.hash_name or "sha256").digest()
