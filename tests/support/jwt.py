"""Keys and token builders for JWT tests: an issuer with an RSA and an EC key, an attacker with
its own, and a way to build any compact JWS, well-formed or not."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from authz_server.identity.encoding import b64url_encode, json_compact
from authz_server.identity.jose import JwkSet, parse_jwks, public_jwk, sign

ISSUER = "https://idp.test"
AUDIENCE = "orders-api"


@dataclass(frozen=True)
class KeyPair:
    alg: str
    private_key: Any
    jwk: Mapping[str, Any]

    @property
    def kid(self) -> str:
        return self.jwk["kid"]

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _pair(alg: str, private_key: Any) -> KeyPair:
    return KeyPair(alg, private_key, public_jwk(private_key.public_key(), alg=alg))


@functools.cache
def issuer_keys() -> tuple[KeyPair, KeyPair]:
    return (_pair("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            _pair("ES256", ec.generate_private_key(ec.SECP256R1())))


@functools.cache
def attacker_keys() -> tuple[KeyPair, KeyPair]:
    return (_pair("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            _pair("ES256", ec.generate_private_key(ec.SECP256R1())))


def issuer_jwks() -> dict[str, Any]:
    return {"keys": [dict(k.jwk) for k in issuer_keys()]}


def issuer_keyset() -> JwkSet:
    return parse_jwks(issuer_jwks())


@functools.cache
def attacker_cert_der() -> bytes:
    key = attacker_keys()[1].private_key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def cert_sha256(label: str) -> bytes:
    """A stand-in client certificate digest (validation only ever sees the digest)."""
    return hashlib.sha256(label.encode()).digest()


def access_claims(now: float, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "exp": int(now) + 300, "iat": int(now),
        "jti": "jti-1", "client_id": "frontend", "scope": "orders:read",
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def compact(header_bytes: bytes, payload_bytes: bytes, signature: bytes) -> str:
    return f"{b64url_encode(header_bytes)}.{b64url_encode(payload_bytes)}.{b64url_encode(signature)}"


def signed(header: Mapping[str, Any] | bytes, claims: Mapping[str, Any] | bytes, alg: str | None,
           key: Any) -> str:
    """A compact JWS over exactly these header/payload bytes, signed with ``alg`` (None: no signature)."""
    head = header if isinstance(header, bytes) else json_compact(header)
    body = claims if isinstance(claims, bytes) else json_compact(claims)
    signing_input = f"{b64url_encode(head)}.{b64url_encode(body)}"
    signature = sign(alg, key, signing_input.encode()) if alg is not None else b""
    return f"{signing_input}.{b64url_encode(signature)}"


def issuer_token(now: float, *, alg: str = "RS256", header: Mapping[str, Any] | None = None, **claims: Any) -> str:
    pair = issuer_keys()[0 if alg == "RS256" else 1]
    full_header = {"alg": alg, "typ": "at+jwt", "kid": pair.kid, **(header or {})}
    return signed(full_header, access_claims(now, **claims), alg, pair.private_key)
