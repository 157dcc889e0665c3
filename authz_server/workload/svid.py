"""SVIDs: X.509-SVIDs and JWT-SVIDs as the SPIFFE standards define them, issued and checked.

X.509-SVID (SPIFFE X509-SVID standard):

* §2 "An X.509 SVID MUST contain exactly one URI SAN, and by extension, exactly one SPIFFE ID."
* §4.1 leaf: "the cA field MUST be set to false" (basic constraints, critical).
* §4.3 "Leaf SVIDs MUST set digitalSignature. They MAY set keyEncipherment and/or keyAgreement"
  and "MUST NOT set keyCertSign or cRLSign"; the extension "MUST be marked as critical".
* §4.4 extended key usage: "id-kp-serverAuth and id-kp-clientAuth ... SHOULD be set".

JWT-SVID (SPIFFE JWT-SVID standard): §2 ``alg`` one of RS/ES/PS 256/384/512, ``typ`` absent or
``JWT``/``JOSE``; §3 ``sub`` is the SPIFFE ID, ``aud`` REQUIRED, ``exp`` REQUIRED. Validation
(§4 "the validator ... MUST ... ensure that the "aud" claim contains a value which is known
to the validator") picks keys from the bundle of the subject's trust domain only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import TokenError, WorkloadError
from ..identity.encoding import b64url_decode, json_object
from ..identity.jose import JwkSet, encode_jwt
from ..identity.tokens import IssuerPolicy, verify_jws
from ..identity.spiffe import split_spiffe_id

# Certificates start this far in the past, so a peer whose clock is a little behind accepts them.
BACKDATE = 10.0
# JWT-SVID §2: "alg" MUST be one of these (RFC 7518 names).
JWT_SVID_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
JWT_SVID_LEEWAY = 30.0
ORGANIZATION = "authz-server dev SPIFFE issuer"


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


@dataclass(frozen=True, slots=True)
class X509Svid:
    """One X.509-SVID and its private key. ``chain`` is leaf first (the CA signs leaves directly)."""

    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    issued_at: float
    expires_at: float
    authority_id: str

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def refresh_at(self) -> float:
        """Half-way through its lifetime: when the issuer replaces it."""
        return self.issued_at + (self.expires_at - self.issued_at) / 2

    @property
    def serial_number(self) -> int:
        return self.certificate.serial_number

    def chain_der(self) -> bytes:
        """ASN.1 DER certificates, concatenated (the Workload API's ``x509_svid``)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_der(self) -> bytes:
        """Unencrypted PKCS#8 DER (the Workload API's ``x509_svid_key``)."""
        return self.private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())


def issue_x509_svid(spiffe_id: str, *, ca_certificate: x509.Certificate, ca_key: Any, authority_id: str,
                    ttl: float, now: float, dns_names: tuple[str, ...] = ()) -> X509Svid:
    """A new key pair and a leaf certificate for ``spiffe_id``, valid until ``now + ttl`` (never
    past the CA's own notAfter). ``dns_names`` become DNS SANs, the first also the subject's
    common name, as SPIRE does for an entry's DNS names; the SPIFFE ID stays the one URI SAN."""
    split_spiffe_id(spiffe_id)  # raises WorkloadError on a malformed ID
    key = ec.generate_private_key(ec.SECP256R1())
    ca_not_after = ca_certificate.not_valid_after_utc.timestamp()
    expires_at = min(now + ttl, ca_not_after)
    not_before = max(now - BACKDATE, ca_certificate.not_valid_before_utc.timestamp())
    ca_ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
                                + [x509.NameAttribute(NameOID.COMMON_NAME, name) for name in dns_names[:1]]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(expires_at))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]
                                                   + [x509.DNSName(name) for name in dns_names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return X509Svid(spiffe_id, (cert,), key, now, expires_at, authority_id)


@dataclass(frozen=True, slots=True)
class JwtSvid:
    token: str = field(repr=False)
    spiffe_id: str
    audience: tuple[str, ...]
    issued_at: float
    expires_at: float


def issue_jwt_svid(spiffe_id: str, audience: tuple[str, ...] | list[str], *, key: Any, kid: str, alg: str,
                   ttl: float, now: float, not_after: float | None = None) -> JwtSvid:
    """A compact JWS (RFC 7515 §7.1) with ``sub``, ``aud``, ``exp``, ``iat``; ``typ: JWT``."""
    split_spiffe_id(spiffe_id)
    audiences = tuple(audience)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise ValueError("a JWT-SVID needs at least one non-empty audience")
    expires_at = int(now + ttl) if not_after is None else int(min(now + ttl, not_after))
    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    claims = {"sub": spiffe_id, "aud": list(audiences), "exp": expires_at, "iat": int(now)}
    return JwtSvid(encode_jwt(claims, key, alg, header), spiffe_id, audiences, float(int(now)),
                   float(expires_at))


class SvidError(WorkloadError):
    """A JWT-SVID that does not validate; ``code`` says why (``TokenError`` codes reused)."""

    default_code = "invalid_jwt_svid"


@dataclass(frozen=True, slots=True)
class ValidatedJwtSvid:
    spiffe_id: str
    trust_domain: str
    claims: Mapping[str, Any]


def _unverified_subject(token: str) -> str:
    """Only to choose whose keys apply: the subject's trust domain owns the signing key."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise SvidError("a JWT-SVID is a compact JWS with 3 segments", code="malformed_token")
    try:
        claims = json_object(b64url_decode(parts[1]))
    except ValueError as exc:
        raise SvidError(f"payload: {exc}", code="malformed_token") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise SvidError("token has no 'sub' claim", code="missing_claim")
    return subject


def validate_jwt_svid(token: str, audience: str, keys: Mapping[str, JwkSet], *, now: float,
                      leeway: float = JWT_SVID_LEEWAY) -> ValidatedJwtSvid:
    """Check ``token`` against the JWT authorities of the trust domains in ``keys`` (domain name →
    key set): signature by a key of the subject's own trust domain, then ``aud``, ``exp``,
    ``nbf``/``iat``. Raises ``SvidError``."""
    if not audience:
        raise SvidError("an audience is required to validate a JWT-SVID", code="missing_audience")
    subject = _unverified_subject(token)
    try:
        domain, path = split_spiffe_id(subject)
    except WorkloadError:
        raise SvidError(f"'sub' {subject[:100]!r} is not a SPIFFE ID", code="invalid_claim") from None
    if not path:
        raise SvidError(f"'sub' {subject[:100]!r} names a trust domain, not a workload", code="invalid_claim")
    domain_keys = keys.get(domain)
    if domain_keys is None:
        raise SvidError(f"no JWT bundle for trust domain {domain!r}", code="untrusted_trust_domain")
    policy = IssuerPolicy(issuer=f"spiffe://{domain}", audiences=(audience,), algorithms=JWT_SVID_ALGORITHMS)
    try:
        verified = verify_jws(token, policy, domain_keys)
    except TokenError as exc:
        raise SvidError(exc.message, code=exc.code) from None
    typ = verified.header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise SvidError(f"typ {str(typ)[:32]!r} is not JWT or JOSE", code="wrong_typ")
    try:
        claims = json_object(verified.payload)
    except ValueError as exc:
        raise SvidError(f"payload: {exc}", code="malformed_token") from None
    if claims.get("sub") != subject:  # the same bytes were read twice; kept as a guard
        raise SvidError("'sub' changed between reads", code="malformed_token")
    exp = _number(claims, "exp")
    if exp is None:
        raise SvidError("token has no 'exp' claim", code="missing_claim")
    if now >= exp + leeway:
        raise SvidError(f"token expired {now - exp:.0f}s ago", code="expired_token")
    nbf = _number(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise SvidError("token is not valid yet", code="token_not_yet_valid")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise SvidError("token claims to be issued in the future", code="iat_in_future")
    aud = claims.get("aud")
    if aud is None:
        raise SvidError("token has no 'aud' claim", code="missing_claim")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise SvidError("'aud' must be a string or an array of strings", code="invalid_claim")
    if audience not in audiences:
        raise SvidError(f"aud {audiences[:5]!r} does not include {audience[:100]!r}", code="wrong_audience")
    return ValidatedJwtSvid(subject, domain, MappingProxyType(claims))


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SvidError(f"'{name}' must be a NumericDate", code="invalid_claim")
    return float(value)
