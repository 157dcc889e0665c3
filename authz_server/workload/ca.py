"""A certificate authority per trust domain: its signing authorities, their rotation, their files.

An *authority* is one CA key and certificate plus the JWT signing key that lives and dies
with it (as SPIRE rotates its X.509 CA and JWT key together). A trust domain has one
*active* authority (it signs), at most one *prepared* successor (already in the bundle, not
signing yet) and *retired* ones (still in the bundle until their certificate expires, so
SVIDs they signed keep validating). The schedule, with ``now`` passed in:

* at half the active CA's lifetime, a successor is prepared and published;
* ``publish_ahead`` later it becomes active (``prepare`` does the same on demand);
* a retired authority leaves the bundle at its notAfter, and its files are deleted.

Files under ``state_dir/<trust domain>/``: ``<id>.ca.pem`` (certificate), ``<id>.ca.key``
and ``<id>.jwt.key`` (PKCS#8 PEM, mode 0600, created with O_EXCL), and ``authorities.json``
(which authority is in which state, and the bundle sequence number). A key file readable by
group or others is refused at start, as ssh refuses such a key.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..errors import ConfigError
from ..identity.jose import public_jwk
from .bundle import TrustBundle
from .files import private_dir, read_private, write_atomic, write_private
from .svid import BACKDATE, ORGANIZATION

log = logging.getLogger(__name__)

MANIFEST = "authorities.json"


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


def _jwt_algorithm(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError(f"a JWT authority key must be RSA or EC P-256, not {type(key).__name__}")


@dataclass(frozen=True, slots=True)
class Authority:
    id: str
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    jwt_key: Any = field(repr=False)
    jwt_kid: str = ""

    @property
    def jwt_algorithm(self) -> str:
        return _jwt_algorithm(self.jwt_key)

    @property
    def not_before(self) -> float:
        return self.certificate.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    @property
    def midlife(self) -> float:
        return self.not_before + (self.not_after - self.not_before) / 2


def create_authority(trust_domain: str, *, ttl: float, jwt_algorithm: str, now: float) -> Authority:
    """A self-signed CA for ``trust_domain`` (X509-SVID §4: ``cA`` true, ``keyCertSign``; its URI
    SAN is the trust domain's own SPIFFE ID) and a fresh JWT signing key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
        .not_valid_before(_utc(now - BACKDATE))
        .not_valid_after(_utc(now + ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    if jwt_algorithm == "RS256":
        jwt_key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif jwt_algorithm == "ES256":
        jwt_key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"JWT-SVIDs are signed ES256 or RS256 here, not {jwt_algorithm!r}")
    stamp = _utc(now).strftime("%Y%m%dT%H%M%SZ")
    return Authority(f"{stamp}-{secrets.token_hex(4)}", cert, key, jwt_key, public_jwk(jwt_key.public_key())["kid"])


@dataclass(frozen=True, slots=True)
class CaChange:
    """What one step of the schedule did: a new authority signs, and/or the bundle changed."""

    activated: bool = False
    bundle_changed: bool = False

    def __bool__(self) -> bool:
        return self.activated or self.bundle_changed

    def __or__(self, other: "CaChange") -> "CaChange":
        return CaChange(self.activated or other.activated, self.bundle_changed or other.bundle_changed)


class CertificateAuthority:
    """One trust domain's authorities, persisted in ``directory``; created on first start."""

    def __init__(self, trust_domain: str, directory: str | os.PathLike[str], *, ca_ttl: float,
                 publish_ahead: float, jwt_algorithm: str, now: float) -> None:
        self.trust_domain = trust_domain
        self.directory = Path(directory)
        self.ca_ttl = ca_ttl
        self.publish_ahead = publish_ahead
        self.jwt_algorithm = jwt_algorithm
        self.sequence = 1
        self.prepared: Authority | None = None
        self.activate_at: float | None = None
        self.retired: list[Authority] = []
        private_dir(self.directory)
        if (self.directory / MANIFEST).exists():
            self.active = self._load()
        else:
            self.active = self._new(now)
            log.info("created the CA of trust domain %s in %s", trust_domain, self.directory)
            self._save()

    # -- state -------------------------------------------------------------------------------

    def authorities(self) -> tuple[Authority, ...]:
        """Every authority in the bundle, oldest first."""
        found = [self.active, *self.retired] + ([self.prepared] if self.prepared else [])
        return tuple(sorted(found, key=lambda a: (a.not_before, a.id)))

    def bundle(self, *, refresh_hint: float | None = None) -> TrustBundle:
        authorities = self.authorities()
        return TrustBundle(self.trust_domain, tuple(a.certificate for a in authorities),
                           tuple((a.jwt_kid, a.jwt_key.public_key()) for a in authorities),
                           self.sequence, refresh_hint)

    def next_event(self) -> float:
        """When ``advance`` has something to do next."""
        times = [self.active.not_after] + [a.not_after for a in self.retired]
        times.append(self.activate_at if self.activate_at is not None else self.active.midlife)
        return min(times)

    # -- schedule ----------------------------------------------------------------------------

    def prepare(self, now: float, *, activate_after: float | None = None) -> CaChange:
        """Publish a successor now; it signs from ``now + activate_after`` (default ``publish_ahead``).

        A successor that was prepared but never signed is replaced."""
        if self.prepared is not None:
            self._delete(self.prepared)
        self.prepared = self._new(now)
        self.activate_at = now + (self.publish_ahead if activate_after is None else max(0.0, activate_after))
        self.sequence += 1
        log.info("trust domain %s: CA %s published, signs from %s", self.trust_domain, self.prepared.id,
                 _utc(self.activate_at).isoformat())
        change = CaChange(bundle_changed=True) | self.advance(now)
        self._save()
        return change

    def advance(self, now: float) -> CaChange:
        """Bring the schedule up to ``now``."""
        activated = bundle_changed = False
        if self.prepared is not None and self.activate_at is not None and now >= self.activate_at:
            self.retired.append(self.active)
            self.active, self.prepared, self.activate_at = self.prepared, None, None
            activated = True
            log.info("trust domain %s: CA %s now signs", self.trust_domain, self.active.id)
        if now >= self.active.not_after:
            # Only after a long downtime: nothing valid signs any more, so replace it at once.
            self.retired.append(self.active)
            if self.prepared is not None:
                self.active, self.prepared, self.activate_at = self.prepared, None, None
            else:
                self.active = self._new(now)
            activated = bundle_changed = True
            log.warning("trust domain %s: the CA had expired; %s signs now", self.trust_domain, self.active.id)
        if self.prepared is None and now >= self.active.midlife:
            self.prepared = self._new(now)
            self.activate_at = now + self.publish_ahead
            bundle_changed = True
            log.info("trust domain %s: CA %s published ahead of rotation", self.trust_domain, self.prepared.id)
        expired = [a for a in self.retired if now >= a.not_after]
        if expired:
            self.retired = [a for a in self.retired if a not in expired]
            for authority in expired:
                self._delete(authority)
            bundle_changed = True
        if bundle_changed:
            self.sequence += 1
        if activated or bundle_changed:
            self._save()
        return CaChange(activated, bundle_changed)

    # -- files -------------------------------------------------------------------------------

    def _new(self, now: float) -> Authority:
        authority = create_authority(self.trust_domain, ttl=self.ca_ttl, jwt_algorithm=self.jwt_algorithm, now=now)
        pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_private(self.directory / f"{authority.id}.ca.key", authority.private_key.private_bytes(*pkcs8))
        write_private(self.directory / f"{authority.id}.jwt.key", authority.jwt_key.private_bytes(*pkcs8))
        write_atomic(self.directory / f"{authority.id}.ca.pem",
                      authority.certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return authority

    def _delete(self, authority: Authority) -> None:
        for suffix in (".ca.key", ".jwt.key", ".ca.pem"):
            (self.directory / f"{authority.id}{suffix}").unlink(missing_ok=True)

    def _save(self) -> None:
        manifest = {
            "trust_domain": self.trust_domain, "sequence": self.sequence, "active": self.active.id,
            "prepared": self.prepared.id if self.prepared else None, "activate_at": self.activate_at,
            "retired": [a.id for a in self.retired],
        }
        write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=2).encode(), mode=0o600)

    def _load(self) -> Authority:
        path = self.directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            active_id = manifest["active"]
            prepared_id = manifest.get("prepared")
            retired_ids = list(manifest.get("retired", []))
            sequence = int(manifest.get("sequence", 1))
            activate_at = manifest.get("activate_at")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a readable authorities file ({exc}); move it away to start a new CA",
                              key="state_dir") from None
        if manifest.get("trust_domain") != self.trust_domain:
            raise ConfigError(f"{path} belongs to trust domain {manifest.get('trust_domain')!r}, "
                              f"not {self.trust_domain!r}", key="state_dir")
        self.sequence = sequence
        active = self._read(active_id)
        if prepared_id:
            self.prepared = self._read(prepared_id)
            self.activate_at = float(activate_at) if activate_at is not None else None
        self.retired = [self._read(i) for i in retired_ids]
        log.info("loaded the CA of trust domain %s from %s", self.trust_domain, self.directory)
        return active

    def _read(self, authority_id: str) -> Authority:
        if not isinstance(authority_id, str) or "/" in authority_id or authority_id.startswith("."):
            raise ConfigError(f"{self.directory / MANIFEST}: bad authority id {authority_id!r}", key="state_dir")
        cert_path = self.directory / f"{authority_id}.ca.pem"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read CA certificate {cert_path}: {exc}", key="state_dir") from None
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [f"spiffe://{self.trust_domain}"]:
            raise ConfigError(f"{cert_path} is not a CA of spiffe://{self.trust_domain}", key="state_dir")
        ca_key = read_private(self.directory / f"{authority_id}.ca.key")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or \
                ca_key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise ConfigError(f"{authority_id}.ca.key in {self.directory} is not the key of {cert_path.name}",
                              key="state_dir")
        jwt_key = read_private(self.directory / f"{authority_id}.jwt.key")
        try:
            _jwt_algorithm(jwt_key)
        except ValueError as exc:
            raise ConfigError(f"{authority_id}.jwt.key in {self.directory}: {exc}", key="state_dir") from None
        return Authority(authority_id, cert, ca_key, jwt_key, public_jwk(jwt_key.public_key())["kid"])

