"""Trust bundles: a trust domain's X.509 and JWT authorities, in the SPIFFE bundle format.

SPIFFE Trust Domain and Bundle standard, §4 "SPIFFE Bundle Format": a JWK Set (RFC 7517)
whose keys carry ``use``: ``x509-svid`` keys have "exactly one" certificate in ``x5c`` (the
CA certificate, whose public key is the JWK's), ``jwt-svid`` keys "MUST" have a ``kid``; the
set may carry ``spiffe_sequence`` and ``spiffe_refresh_hint`` (seconds). §4.2.1: a key whose
``use`` is missing or unknown is ignored, not an error. Federated trust domains are served
to workloads from these documents.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..identity.encoding import jwk_set_document
from ..identity.jose import JwkError, JwkSet, parse_jwk, public_jwk

X509_SVID_USE = "x509-svid"
JWT_SVID_USE = "jwt-svid"
MAX_BUNDLE_KEYS = 100


class BundleError(ValueError):
    """A SPIFFE bundle document that cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """What a workload needs to trust one trust domain's SVIDs."""

    trust_domain: str
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: tuple[tuple[str, Any], ...]  # (kid, public key), in publication order
    sequence: int = 0
    refresh_hint: float | None = None

    @property
    def id(self) -> str:
        return f"spiffe://{self.trust_domain}"

    def x509_der(self) -> bytes:
        """The CA certificates as concatenated ASN.1 DER (the Workload API's bundle bytes)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.x509_authorities)

    def x509_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    def jwt_keys(self) -> JwkSet:
        """The JWT authorities as verification keys (for JWT-SVID validation)."""
        keys = []
        for kid, key in self.jwt_authorities:
            keys.append(parse_jwk(public_jwk(key, kid=kid, use="sig")))
        return JwkSet(tuple(keys))

    def jwks(self) -> dict[str, Any]:
        """The JWT authorities only, as a plain JWK Set (the Workload API's JWT bundle)."""
        return {"keys": [public_jwk(key, kid=kid, use=JWT_SVID_USE) for kid, key in self.jwt_authorities]}

    def to_spiffe(self) -> dict[str, Any]:
        """The SPIFFE bundle document (§4), as a JSON-ready mapping."""
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            jwk = public_jwk(cert.public_key(), use=X509_SVID_USE)
            del jwk["kid"]  # §4.2.1: x509-svid keys are identified by their certificate
            jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")]
            keys.append(jwk)
        keys.extend(public_jwk(key, kid=kid, use=JWT_SVID_USE) for kid, key in self.jwt_authorities)
        document: dict[str, Any] = {"keys": keys, "spiffe_sequence": self.sequence}
        if self.refresh_hint is not None:
            document["spiffe_refresh_hint"] = int(self.refresh_hint)
        return document

    def to_json(self) -> bytes:
        return json.dumps(self.to_spiffe(), indent=2).encode()


def parse_spiffe_bundle(trust_domain: str, document: bytes | str | Mapping[str, Any]) -> TrustBundle:
    """A SPIFFE bundle document → ``TrustBundle``; raises ``BundleError``."""
    try:
        data, keys = jwk_set_document(document)
    except ValueError as exc:
        raise BundleError(f"bundle for {trust_domain}: {exc}") from None
    if len(keys) > MAX_BUNDLE_KEYS:
        raise BundleError(f"bundle for {trust_domain}: {len(keys)} keys is more than {MAX_BUNDLE_KEYS}")
    sequence = data.get("spiffe_sequence", 0)
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise BundleError(f"bundle for {trust_domain}: 'spiffe_sequence' must be a non-negative integer")
    hint = data.get("spiffe_refresh_hint")
    if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint < 0):
        raise BundleError(f"bundle for {trust_domain}: 'spiffe_refresh_hint' must be a non-negative integer")
    authorities: list[x509.Certificate] = []
    jwt_keys: list[tuple[str, Any]] = []
    for index, entry in enumerate(keys):
        where = f"bundle for {trust_domain}: keys[{index}]"
        if not isinstance(entry, Mapping):
            raise BundleError(f"{where}: not a JSON object")
        use = entry.get("use")
        if use == X509_SVID_USE:
            authorities.append(_x509_authority(entry, where))
        elif use == JWT_SVID_USE:
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid:
                raise BundleError(f"{where}: a jwt-svid key must have a 'kid'")
            try:
                jwk = parse_jwk({k: v for k, v in entry.items() if k != "use"})
            except JwkError as exc:
                raise BundleError(f"{where}: {exc}") from None
            jwt_keys.append((kid, jwk.key))
        # §4.2.1: any other (or no) "use" is ignored
    return TrustBundle(trust_domain, tuple(authorities), tuple(jwt_keys), sequence,
                       float(hint) if hint is not None else None)


def _x509_authority(entry: Mapping[str, Any], where: str) -> x509.Certificate:
    chain = entry.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise BundleError(f"{where}: an x509-svid key must have exactly one certificate in 'x5c'")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except ValueError as exc:
        raise BundleError(f"{where}: 'x5c' is not a DER certificate: {exc}") from None
    try:
        jwk = parse_jwk({k: v for k, v in entry.items() if k not in ("use", "x5c")})
    except JwkError as exc:
        raise BundleError(f"{where}: {exc}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if jwk.key.public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise BundleError(f"{where}: the JWK is not the public key of its 'x5c' certificate")
    return cert
